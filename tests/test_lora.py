"""LoRA and QLoRA: the quantized base, the adapters in the model, training only the adapters, resume,
and the adapter / merged-model converters (PEFT's format without torch; the logit comparisons
against transformers + peft are in test_lora_hf.py).

Tolerances: float32 throughout. Merged vs adapted logits and QLoRA gradients 1e-5 (the same math in
another order); quantize-then-dequantize exactly equal up to float32 rounding of the same products.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_util import TOKENS, make_phi3_hf_dir
from trainutil import run_train_py, small_config, write_config, write_corpus

from phi3jax import lora as lora_lib
from phi3jax.config import ConfigError, LoraConfig, Phi3Config
from phi3jax.convert.hf import load_hf
from phi3jax.convert.lora import load_base, load_lora_run, merge_lora, open_base, restore_adapters
from phi3jax.convert.peft import lora_to_peft, peft_to_lora, read_peft, write_peft
from phi3jax.convert.safetensors import CheckpointError
from phi3jax.model import Phi3, init_params, unstack_layers
from phi3jax.ops import quant
from phi3jax.train import checkpoint as ckpt
from phi3jax.train import loop
from phi3jax.train.config import TrainConfigError
from phi3jax.train.metrics import read_metrics
from phi3jax.train.step import loss_and_grads, loss_sums

SMALL = Phi3Config.preset("tiny").replace(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, dtype="float32",
                                          param_dtype="float32")


def _random_adapters(cfg, lora, seed=1, scale=0.05):
    """Adapters with non-zero A and B (fresh ones have B = 0 and change nothing)."""
    fresh = lora_lib.init_adapters(cfg, lora, seed)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(fresh))))
    return jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape, jnp.float32), fresh)


@functools.partial(jax.jit, static_argnames=("cfg", "lora", "scan_layers"))
def _apply(variables, tokens, rng, cfg, lora, scan_layers):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    rngs = None if rng is None else {"dropout": rng}
    return Phi3(cfg, scan_layers=scan_layers, lora=lora).apply(variables, tokens, positions, rngs=rngs)[0]


def _logits(cfg, variables, tokens, lora=None, scan_layers=True, rng=None):
    """Logits of the model (jitted: one compile per model variant)."""
    return np.asarray(_apply(variables, jnp.asarray(tokens, jnp.int32), rng, cfg, lora, scan_layers))


# ----------------------------------------------------------------------------- quantization
def _reference_dequantized(w: np.ndarray, fmt: str, axis: int) -> np.ndarray:
    """Quantize-then-dequantize written independently: move the blocked axis last, cut it into blocks,
    and pick each value's nearest level (nf4: by brute-force distance to all 16 codes)."""
    moved = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    n = moved.shape[-1]
    b = next(s for s in (64, 32, 16, 8, 4, 2) if n % s == 0)
    blocks = moved.reshape(-1, n // b, b)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    x = blocks / np.where(absmax == 0, 1, absmax)
    if fmt == "int8":
        levels = np.clip(np.round(x * 127), -127, 127) / 127
    else:
        codes = np.asarray(quant.NF4_CODES)
        levels = codes[np.argmin(np.abs(x[..., None] - codes), axis=-1)]
    return np.moveaxis((levels * absmax).reshape(moved.shape), -1, axis)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("shape, axis", [((64, 3, 4, 16), 0), ((4, 96, 64), 1), ((96, 64), 0), ((2, 48, 8), 1)])
def test_dequantized_base_equals_quantize_then_dequantize_computed_independently(fmt, shape, axis):
    w = np.random.default_rng(0).normal(0, 0.1, shape).astype(np.float32)
    w[(0,) * len(shape)] = 0.0
    stored = quant.quantize(w, fmt, axis)
    got = np.asarray(quant.dequantize(stored, axis, jnp.float32))
    np.testing.assert_allclose(got, _reference_dequantized(w, fmt, axis), rtol=1e-6, atol=1e-7)
    values = stored[fmt]
    assert values.dtype == (np.int8 if fmt == "int8" else np.uint8)
    assert values.size == (w.size if fmt == "int8" else w.size // 2)  # nf4: two codes per byte
    # the expansion is close to the weight (nf4 is coarse: 16 levels per block)
    err = np.abs(got - w).max() / np.abs(w).max()
    assert err < (0.01 if fmt == "int8" else 0.2)


def test_block_size_and_its_error():
    assert [quant.block_size(n) for n in (3072, 96, 688, 16)] == [64, 32, 16, 16]
    with pytest.raises(ValueError, match="blocks of an even size"):
        quant.block_size(7)


# ----------------------------------------------------------------------------- the adapted model
@pytest.mark.parametrize("kv_heads, base_dtype", [(2, "float32"), (4, "int8"), (2, "nf4")])
def test_adapted_logits_equal_the_merged_model(kv_heads, base_dtype):
    cfg = SMALL.replace(num_key_value_heads=kv_heads)
    lora = LoraConfig(rank=4, alpha=8, targets=("qkv", "o", "down"), base_dtype=base_dtype)
    params = init_params(cfg, 0)
    base = lora_lib.quantize_base(params, cfg, lora)
    adapters = _random_adapters(cfg, lora)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    adapted = _logits(cfg, {"params": base, "lora": adapters}, tokens, lora)
    merged = _logits(cfg, {"params": lora_lib.merge(base, adapters, cfg, lora)}, tokens)
    np.testing.assert_allclose(adapted, merged, atol=1e-5, rtol=0)
    if base_dtype == "nf4":  # per-layer trees (what decoding uses) merge the same
        per_layer = lora_lib.merge(unstack_layers(base), unstack_layers(adapters), cfg, lora)
        np.testing.assert_allclose(_logits(cfg, {"params": per_layer}, tokens, scan_layers=False), merged, atol=1e-5)
    if base_dtype == "float32":  # fresh adapters (B = 0) are the base model exactly, and the adapters matter
        fresh = _logits(cfg, {"params": base, "lora": lora_lib.init_adapters(cfg, lora)}, tokens, lora)
        np.testing.assert_array_equal(fresh, _logits(cfg, {"params": params}, tokens))
        assert np.abs(adapted - fresh).max() > 1e-3


def test_adapter_layout_follows_pefts_modules():
    lora = LoraConfig(rank=8)
    shapes = jax.tree.map(lambda x: x.shape, lora_lib.abstract_adapters(SMALL, lora))["layers"]
    assert shapes["attn"] == {"qkv_a": (2, 64, 8), "q_b": (2, 8, 4, 16), "kv_b": (2, 8, 2, 2, 16),
                              "o_a": (2, 4, 16, 8), "o_b": (2, 8, 64)}
    assert shapes["mlp"] == {"gate_up_a": (2, 64, 8), "gate_up_b": (2, 8, 2, 96), "down_a": (2, 96, 8),
                             "down_b": (2, 8, 64)}


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_qlora_gradient_equals_the_gradient_on_the_dequantized_weights(fmt):
    cfg = SMALL
    lora = LoraConfig(rank=4, base_dtype=fmt)
    base = lora_lib.quantize_base(init_params(cfg, 0), cfg, lora)
    dense = jax.tree.map(lambda x: x, base, is_leaf=quant.is_quantized)
    for proj in lora_lib.projections(cfg):  # expand each projection on its own, outside the model
        stored = lora_lib.get(dense["layers"], proj.leaf)
        lora_lib.set_leaf(dense["layers"], proj.leaf, quant.dequantize(stored, proj.n_in, jnp.float32))
    adapters = _random_adapters(cfg, lora)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones_like(tokens),
             "segment_ids": np.ones_like(tokens), "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))}

    def grads(frozen, lora_cfg):
        return jax.grad(lambda a: loss_sums(a, cfg, batch, frozen=frozen, lora=lora_cfg)[0])(adapters)

    got = grads(base, lora)
    want = grads(dense, LoraConfig(rank=4, base_dtype="float32"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(got))
    # The same gradient with full remat, and accumulated over two micro-batches.
    if fmt == "nf4":
        remat = jax.grad(lambda a: loss_sums(a, cfg.replace(remat_policy="full"), batch, frozen=base, lora=lora)[0])
        _, _, accum = loss_and_grads(adapters, cfg, batch, accum_steps=2, frozen=base, lora=lora)
        _, count = loss_sums(adapters, cfg, batch, frozen=base, lora=lora)
        for g, r, a in zip(jax.tree.leaves(got), jax.tree.leaves(remat(adapters)), jax.tree.leaves(accum),
                           strict=True):
            scale = float(np.abs(g).max())
            np.testing.assert_allclose(np.asarray(r), np.asarray(g), atol=1e-6 * scale)
            np.testing.assert_allclose(np.asarray(a) * float(count), np.asarray(g), atol=1e-5 * scale)


def test_dropout_needs_an_rng_and_is_deterministic_per_rng():
    cfg, lora = SMALL, LoraConfig(rank=4, dropout=0.5)
    variables = {"params": init_params(cfg, 0), "lora": _random_adapters(cfg, lora)}
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 8))

    def run(rng):
        return _logits(cfg, variables, tokens, lora, rng=rng)

    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    np.testing.assert_array_equal(run(None), _logits(cfg, variables, tokens, LoraConfig(rank=4)))


def test_bad_lora_settings_name_the_key():
    with pytest.raises(ConfigError, match="lora.targets"):
        LoraConfig(targets=("q_proj",))
    with pytest.raises(ConfigError, match="lora.base_dtype"):
        LoraConfig(base_dtype="int4")
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0)
    assert LoraConfig(targets="qkv, down").targets == ("qkv", "down")
    with pytest.raises(TrainConfigError, match="init_from"):
        small_config("run", None, lora={"rank": 4})
    with pytest.raises(TrainConfigError, match="lora.rank"):
        small_config("run", None, init_from="hf:x", lora={"rank": -1})


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    """A small plain run: the base the LoRA runs adapt."""
    cfg = small_config(tmp_path_factory.mktemp("base") / "run", corpus, steps=4, save_every=4,
                       **{"model.dtype": "float32"})
    loop.train(cfg)
    return cfg.run_dir


def _lora_config(run_dir, corpus, base_run, **overrides):
    lora = {"rank": 4, "alpha": 8.0, "base_dtype": "nf4", "dropout": 0.1, **overrides.pop("lora", {})}
    settings = {"steps": 8, "save_every": 4, "optim": {"learning_rate": 1e-2, "warmup_steps": 1}, **overrides}
    return small_config(run_dir, corpus, init_from=f"ckpt:{base_run}", lora=lora, **settings)


def test_frozen_means_frozen_only_the_adapters_are_trained_held_and_saved(tmp_path, corpus, base_run):
    cfg = _lora_config(tmp_path / "lora", corpus, base_run)
    seen = {}

    def watch(step, run):
        seen["run"] = run

    result = loop.train(cfg, on_step=watch)
    run = seen["run"]
    lora = cfg.lora
    source, start = open_base(cfg.init_from)
    assert start is None
    _, fresh_base = load_base(source, lora)
    for a, b in zip(jax.tree.leaves(run.frozen), jax.tree.leaves(fresh_base), strict=True):  # bit for bit
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    adapter_shapes = {x.shape for x in jax.tree.leaves(lora_lib.abstract_adapters(run.model_cfg, lora))}
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0]
    assert moments and {x.shape for x in moments} <= adapter_shapes
    saved = restore_adapters(result.run_dir, 8, run.model_cfg, lora)
    assert jax.tree.structure(saved) == jax.tree.structure(run.state.params)
    assert float(jnp.abs(saved["layers"]["attn"]["o_b"]).max()) > 0  # B moved off zero: it trained
    with open(os.path.join(result.run_dir, "config.yaml")) as f:
        text = f.read()
    assert "base_dtype: nf4" in text and f"init_from: ckpt:{base_run}" in text
    # The adapted run loads as one model, and the converters that expect a plain run say what to use.
    cfg_m, merged, _ = load_lora_run(result.run_dir)
    assert jax.tree.structure(merged) == jax.tree.structure(ckpt.load_run(base_run)[1])
    with pytest.raises(ckpt.RunDirError, match="merge-lora"):
        from phi3jax.convert.orbax import OrbaxSource

        OrbaxSource(result.run_dir)
    # Resuming with other LoRA settings is refused, even with resume.allow_changes (other adapter shapes).
    with pytest.raises(TrainConfigError, match="lora.rank: 4 -> 8"):
        loop.train(_lora_config(tmp_path / "lora", corpus, base_run, lora={"rank": 8}, steps=10))
    with pytest.raises(TrainConfigError, match="same lora settings"):
        loop.train(_lora_config(tmp_path / "lora", corpus, base_run, lora={"rank": 8}, steps=10,
                                resume={"allow_changes": True}))


def test_killed_lora_run_resumes_bit_for_bit(tmp_path, corpus, base_run):
    reference = _lora_config(tmp_path / "reference", corpus, base_run)
    loop.train(reference)
    cfg = _lora_config(tmp_path / "killed", corpus, base_run)
    killed = run_train_py(["--config", write_config(cfg, tmp_path / "cfg.yaml")], fault="kill_after_step:6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert ckpt.list_steps(cfg.run_dir) == [4]
    assert loop.train(cfg).step == 8

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}

    assert losses(cfg.run_dir) == losses(reference.run_dir)
    model_cfg = ckpt.model_config(cfg.run_dir)
    for a, b in zip(jax.tree.leaves(restore_adapters(cfg.run_dir, 8, model_cfg, cfg.lora)),
                    jax.tree.leaves(restore_adapters(reference.run_dir, 8, model_cfg, cfg.lora)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- converters
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    return make_phi3_hf_dir(tmp_path_factory.mktemp("hf") / "base", dtype="float32", seed=5, num_key_value_heads=2)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_base):
    """A PEFT adapter with non-zero A and B (written by phi3jax) imported as a LoRA run directory."""
    root = tmp_path_factory.mktemp("imported")
    cfg, _ = load_hf(hf_base, dtype="float32")
    lora = LoraConfig(rank=4, alpha=16, targets=("qkv", "o", "gate_up", "down"))
    adapters = _random_adapters(cfg, lora, seed=7, scale=0.1)
    write_peft(adapters, cfg, lora, root / "peft", base_model=str(hf_base))
    run_dir = peft_to_lora(hf_base, root / "peft", root / "run")
    return cfg, lora, adapters, run_dir


def test_peft_files_round_trip(imported, tmp_path):
    cfg, lora, adapters, run_dir = imported
    exported = lora_to_peft(run_dir, tmp_path / "again")
    conf = json.loads(open(os.path.join(exported, "adapter_config.json")).read())
    assert conf["r"] == 4 and conf["lora_alpha"] == 16 and conf["peft_type"] == "LORA"
    assert conf["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    lora2, back = read_peft(exported, cfg)
    assert lora2.targets == lora.targets and lora2.scale == lora.scale
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        lora_to_peft(run_dir, tmp_path / "again")


def test_pefts_unsupported_settings_are_named(imported, tmp_path):
    cfg, lora, adapters, _ = imported
    out = write_peft(adapters, cfg, lora, tmp_path / "a")
    path = os.path.join(out, "adapter_config.json")
    conf = json.loads(open(path).read())
    for key, value, match in (("use_dora", True, "use_dora"), ("target_modules", ["q_proj"], "target_modules"),
                              ("rank_pattern", {"qkv_proj": 8}, "rank_pattern")):
        bad = {**conf, key: value}
        with open(path, "w") as f:
            json.dump(bad, f)
        with pytest.raises(CheckpointError, match=match):
            read_peft(out, cfg)


def test_merged_hf_directory_equals_the_adapter_applied(imported, tmp_path):
    cfg, lora, adapters, run_dir = imported
    base_cfg, base = load_hf(_base_dir(run_dir), dtype="float32")
    adapted = _logits(base_cfg, {"params": base, "lora": adapters}, [TOKENS], lora)
    out = merge_lora(run_dir, tmp_path / "merged", fmt="hf", dtype="float32")
    merged_cfg, merged = load_hf(out, dtype="float32")
    np.testing.assert_allclose(_logits(merged_cfg, {"params": merged}, [TOKENS]), adapted, atol=1e-5, rtol=0)
    # generate / chat / eval load a LoRA run directory as the same model
    _, loaded, _ = load_lora_run(run_dir, dtype="float32")
    np.testing.assert_allclose(_logits(merged_cfg, {"params": loaded}, [TOKENS]), adapted, atol=1e-5, rtol=0)


def test_merged_gguf_runs_in_llama_cpp_with_the_adapted_logits(imported, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dev dependency")
    cfg, lora, adapters, run_dir = imported
    base_cfg, base = load_hf(_base_dir(run_dir), dtype="float32")
    adapted = _logits(base_cfg, {"params": base, "lora": adapters}, [TOKENS], lora)[0]
    path = merge_lora(run_dir, tmp_path / "merged.gguf", fmt="gguf", quant="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, type_k=0, type_v=0,
                          n_threads=2, verbose=False)
    llm.eval(TOKENS)
    theirs = np.array(llm.scores[: len(TOKENS)])
    llm.close()
    np.testing.assert_allclose(theirs, adapted, atol=1e-3, rtol=0)  # as test_convert_llama_cpp's float32 case


def test_imported_adapter_run_continues_training(imported, tmp_path, corpus):
    cfg, lora, adapters, run_dir = imported
    cont = small_config(tmp_path / "cont", corpus, init_from=f"ckpt:{run_dir}", steps=2, save_every=2,
                        lora={"rank": 4, "alpha": 16.0}, model={"dtype": "float32"},
                        data={"path": corpus, "tokenizer": run_dir, "val_fraction": 0.0},
                        optim={"learning_rate": 1e-9, "warmup_steps": 0})
    result = loop.train(cont)
    assert result.step == 2
    trained = restore_adapters(result.run_dir, 2, cfg, lora)  # a vanishing step from the imported adapters
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with open(os.path.join(result.run_dir, "config.yaml")) as f:
        assert f"init_from: ckpt:{run_dir}" in f.read()
    # its base is the root HF model, and its adapters started from the imported ones
    source, start = open_base(f"ckpt:{result.run_dir}")
    assert os.path.samefile(source.directory, _base_dir(run_dir)) and start[0] == result.run_dir
    with pytest.raises(TrainConfigError, match="lora.rank and lora.targets must match"):
        loop.train(small_config(tmp_path / "cont2", corpus, init_from=f"ckpt:{run_dir}", lora={"rank": 8},
                                model={"dtype": "float32"}, data={"path": corpus, "tokenizer": run_dir}))


def _base_dir(run_dir):
    with open(os.path.join(run_dir, "config.yaml")) as f:
        import yaml

        return yaml.safe_load(f)["init_from"].partition(":")[2]


def test_generate_chat_eval_load_a_lora_run_or_a_peft_adapter_as_the_adapted_model(imported):
    import argparse

    from phi3jax.cli.common import load_model

    cfg, lora, adapters, run_dir = imported
    base_cfg, base = load_hf(_base_dir(run_dir), dtype="float32")
    adapted = _logits(base_cfg, {"params": base, "lora": adapters}, [TOKENS], lora)
    peft_dir = os.path.join(os.path.dirname(run_dir), "peft")
    for args in (argparse.Namespace(ckpt=None, hf_dir=_base_dir(run_dir), adapter=peft_dir, dtype=None),
                 argparse.Namespace(ckpt=run_dir, hf_dir=None, adapter=None, dtype=None)):
        got_cfg, params, _ = load_model(args)
        assert got_cfg.param_dtype == "float32"
        np.testing.assert_allclose(_logits(got_cfg, {"params": params}, [TOKENS]), adapted, atol=1e-5, rtol=0)
