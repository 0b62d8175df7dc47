"""Logit parity with transformers.Phi3ForCausalLM (the `torch` tests), and the model's structural promises.

Tolerance: float32 end to end on both sides, so the only differences are summation order
and transcendental-function rounding: max |diff| <= 1e-4 on logits of magnitude ~1-10.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from phi3jax import forward, load_hf
from phi3jax.model import init_params, param_logical_axes
from tests.conftest import longrope_parameters, make_hf_dir, make_hf_model

F32_TOL = 1e-4

VARIANTS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "partial_rotary_tied_longrope": dict(  # Phi-4-mini-like
        num_attention_heads=2, num_key_value_heads=1, hidden_size=128, partial_rotary_factor=0.75,
        tie_word_embeddings=True, original_max_position_embeddings=48,
        rope_parameters=longrope_parameters(rotary_dim=48, partial_rotary_factor=0.75)),
    "longrope": dict(original_max_position_embeddings=48, rope_parameters=longrope_parameters(16)),
    "sliding_window": dict(sliding_window=9),
    "head_dim_96": dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=2),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(directory, **VARIANTS[request.param])
    cfg, params = load_hf(directory)
    return request.param, hf, cfg, params


def hf_logits(hf, tokens, **kwargs):
    import torch

    kwargs = {k: torch.as_tensor(v) for k, v in kwargs.items()}
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs).logits.float().numpy()


# 70 crosses LongRoPE's switch (48) and the window (9); 300 spans several tiles of the CPU schedule.
@pytest.mark.torch
@pytest.mark.parametrize("length", [20, 70, 300])
def test_logits_match_hf_in_float32(variant, length):
    name, hf, cfg, params = variant
    tokens = np.random.RandomState(length).randint(0, cfg.vocab_size, (2, length))
    ours = np.asarray(forward(params, cfg, tokens))
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=F32_TOL, rtol=0, err_msg=name)


@pytest.mark.torch
def test_longrope_switch_is_decided_per_batch_like_hf(tmp_path):
    # A short row batched with a long one: HF uses the long factors for both (max position in the batch).
    hf = make_hf_model(tmp_path, original_max_position_embeddings=32, rope_parameters=longrope_parameters(16))
    cfg, params = load_hf(tmp_path)
    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 40))
    mask = np.ones_like(tokens)
    mask[1, 30:] = 0  # row 1 holds only 30 real tokens (right padding)
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0)
    ours = np.asarray(forward(params, cfg, tokens, padding_mask=mask))
    ref = hf_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    np.testing.assert_allclose(ours[0], ref[0], atol=F32_TOL, rtol=0)
    np.testing.assert_allclose(ours[1, :30], ref[1, :30], atol=F32_TOL, rtol=0)
    # ...and the short row alone would use the short factors, giving different logits.
    alone = np.asarray(forward(params, cfg, tokens[1:, :30]))
    assert np.abs(alone[0] - ours[1, :30]).max() > 1e-3


@pytest.mark.torch
def test_explicit_attention_factor_is_used_as_hf_uses_it(tmp_path):
    hf = make_hf_model(tmp_path, original_max_position_embeddings=32,
                       rope_parameters=longrope_parameters(16, attention_factor=1.7))
    cfg, params = load_hf(tmp_path)
    assert cfg.rope_attention_scaling == 1.7
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 50))
    np.testing.assert_allclose(np.asarray(forward(params, cfg, tokens)), hf_logits(hf, tokens), atol=F32_TOL, rtol=0)


@pytest.mark.torch
def test_left_padded_batch_matches_hf_on_real_tokens(tmp_path):
    hf = make_hf_model(tmp_path, num_key_value_heads=2, sliding_window=6)
    cfg, params = load_hf(tmp_path)
    rs = np.random.RandomState(2)
    lengths = [25, 12, 18]
    tokens = np.zeros((3, 25), np.int64)
    mask = np.zeros((3, 25), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, 25 - n:] = rs.randint(3, cfg.vocab_size, n)
        mask[row, 25 - n:] = 1
    positions = np.where(mask, np.cumsum(mask, 1) - 1, 0)
    ours = np.asarray(forward(params, cfg, tokens, padding_mask=mask))
    ref = hf_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=F32_TOL, rtol=0)


def test_packed_sequences_equal_documents_run_one_by_one(tmp_path):
    make_hf_dir(tmp_path, num_key_value_heads=2, sliding_window=7)
    cfg, params = load_hf(tmp_path)
    rs = np.random.RandomState(3)
    docs = [rs.randint(3, cfg.vocab_size, n) for n in (11, 5, 16, 140, 130)]  # 302 tokens: several tiles
    packed = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(len(d), k + 1) for k, d in enumerate(docs)])[None]
    ours = np.asarray(forward(params, cfg, packed, segment_ids=segments))[0]
    start = 0
    for doc in docs:
        alone = np.asarray(forward(params, cfg, doc[None]))[0]
        np.testing.assert_allclose(ours[start:start + len(doc)], alone, atol=1e-5, rtol=0)
        start += len(doc)


@pytest.mark.torch
def test_bfloat16_top1_agrees_with_hf_where_the_float32_margin_exceeds_bf16_error(tmp_path):
    """bfloat16 keeps 8 mantissa bits, so logits carry errors of order 1e-2; HF's own eager and
    sdpa bf16 paths disagree on ~2% of argmaxes. Bound: twice the largest deviation of HF's own
    bf16 logits from its f32 logits on this batch (either side may err that far, in opposite
    directions). Where the f32 top-2 margin exceeds it, both bf16 argmaxes must be the f32 one."""
    hf32 = make_hf_model(tmp_path / "f32", num_key_value_heads=2, hidden_size=128, num_attention_heads=4,
                         vocab_size=1024)
    import torch

    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    hf16.save_pretrained(tmp_path / "bf16")
    cfg, params = load_hf(tmp_path / "bf16")
    assert cfg.dtype == "bfloat16"
    tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (4, 64))
    ref32 = hf_logits(hf32, tokens)
    ref16 = hf_logits(hf16, tokens)
    ours = np.asarray(forward(params, cfg, tokens))
    bound = 2 * np.abs(ref16 - ref32).max()
    top2 = np.sort(ref32, axis=-1)[..., -2:]
    confident = (top2[..., 1] - top2[..., 0]) > bound
    assert confident.mean() > 0.5, "test too weak: most positions are within the bf16 error bound"
    truth = ref32.argmax(-1)
    assert (ours.argmax(-1) == truth)[confident].all()
    assert (ref16.argmax(-1) == truth)[confident].all()


def test_out_of_range_tokens_are_rejected_at_the_api_edge(tmp_path):
    make_hf_dir(tmp_path)
    cfg, params = load_hf(tmp_path)
    with pytest.raises(ValueError, match=r"token ids \[512\] are outside the vocabulary \[0, 512\)"):
        forward(params, cfg, np.array([[1, 512]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        forward(params, cfg, np.array([[-1, 2]]))


def test_remat_changes_neither_parameter_paths_nor_results():
    import jax

    from phi3jax import Phi3Config
    from phi3jax.train.step import loss_and_grads

    cfg = Phi3Config.preset("tiny")
    params = init_params(cfg, 0)
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 16))
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((2, 16), np.float32),
             "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16), (2, 1))}
    base = jax.jit(loss_and_grads, static_argnums=1)(params, cfg, batch)
    for policy in ("full", "dots", "attention_out"):
        remat_cfg = cfg.replace(remat_policy=policy)
        remat_params = init_params(remat_cfg, 0)
        assert jax.tree.structure(remat_params) == jax.tree.structure(params)
        loss, _, grads = jax.jit(loss_and_grads, static_argnums=1)(params, remat_cfg, batch)
        np.testing.assert_allclose(loss, base[0], rtol=1e-6)
        for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(base[2]), strict=True):
            np.testing.assert_allclose(g, h, atol=1e-6)


def test_every_parameter_has_logical_axis_names_of_its_rank():
    import jax

    from phi3jax import Phi3Config

    cfg = Phi3Config.preset("tiny")
    params = init_params(cfg, 0)
    axes = param_logical_axes(cfg)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec = flat_axes[path]
        # Every axis named, but the stacking axis of a fused weight (qkv, kv, gate_up): never sharded.
        assert len(spec) == leaf.ndim and sum(n is None for n in spec) <= 1, (path, spec)
        assert all(isinstance(n, str) for n in spec if n is not None), (path, spec)
    P = jax.sharding.PartitionSpec
    assert axes["layers"]["attn"]["q"] == P("layers", "embed", "heads", "head_dim")  # tiny has GQA: q and kv
    assert axes["layers"]["attn"]["kv"] == P("layers", "embed", None, "kv_heads", "head_dim")
    assert axes["layers"]["mlp"]["gate_up"] == P("layers", "embed", None, "mlp")


def test_one_parameter_layout_fused_as_gemma_fuses_it():
    """q/k/v as one stacked weight when every head has its own k/v, q and kv under GQA; gate and up stacked."""
    from phi3jax import Phi3Config

    mha = init_params(Phi3Config.preset("tiny").replace(num_key_value_heads=4), 0)["layers"]
    gqa = init_params(Phi3Config.preset("tiny"), 0)["layers"]
    assert set(mha["attn"]) == {"qkv", "o"} and mha["attn"]["qkv"].shape == (4, 256, 3, 4, 64)
    assert set(gqa["attn"]) == {"q", "kv", "o"} and gqa["attn"]["kv"].shape == (4, 256, 2, 2, 64)
    assert set(gqa["mlp"]) == {"gate_up", "down"} and gqa["mlp"]["gate_up"].shape == (4, 256, 2, 688)


def test_per_layer_parameters_give_the_same_logits_as_the_stacked_ones():
    """scan_layers=False runs the same leaves kept per layer (what generation uses): float32, 1e-6."""
    import jax

    from phi3jax import Phi3Config
    from phi3jax.model import stack_layers, unstack_layers

    cfg = Phi3Config.preset("tiny").replace(vocab_size=512)
    params = init_params(cfg, 0)
    per_layer = unstack_layers(params)
    assert "layers" not in per_layer and set(per_layer["layers_3"]) == set(params["layers"])
    tokens = np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 24))
    np.testing.assert_allclose(np.asarray(forward(per_layer, cfg, tokens)), np.asarray(forward(params, cfg, tokens)),
                               atol=1e-6, rtol=0)
    back = stack_layers(per_layer)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_remat_policy_names_are_the_configs():
    from phi3jax.config import REMAT_POLICIES
    from phi3jax.model import REMAT_POLICIES as POLICIES

    assert {"none", *POLICIES} == set(REMAT_POLICIES)


def test_compiled_program_does_not_grow_with_depth():
    """nn.scan keeps one copy of the layer: the optimised HLO of 32 layers is the size of 4's."""
    import jax

    from phi3jax import Phi3Config
    from phi3jax.model import logits_fn

    sizes = {}
    for layers in (4, 32):
        cfg = Phi3Config.preset("tiny").replace(num_hidden_layers=layers)
        params = jax.eval_shape(lambda c=cfg: init_params(c, 0))
        tokens = jax.ShapeDtypeStruct((1, 16), np.int32)
        lowered = jax.jit(logits_fn, static_argnums=1).lower(params, cfg, tokens)
        sizes[layers] = len(lowered.compile().as_text())
    assert sizes[32] < 1.1 * sizes[4], sizes
