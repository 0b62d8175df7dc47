"""generate(): token-exact agreement with HF's greedy generate, stopping, sampling, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3jax import generate, load_hf
from phi3jax.config import Phi3Config
from phi3jax.inference import generate as gen
from phi3jax.inference.generate import inference_params
from phi3jax.inference.sampling import SamplingParams, greedy_tokens
from phi3jax.model import abstract_params, count_params, layers_stacked, unstack_layers
from tests.conftest import BASE_HF_CONFIG, longrope_parameters, make_hf_dir, make_hf_model

EOS = 2


def hf_greedy(hf, prompts, max_new_tokens, eos=EOS):
    """HF generate on a left-padded batch (its own convention); returns the new tokens per row."""
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    import torch

    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                          max_new_tokens=max_new_tokens, eos_token_id=[eos], pad_token_id=0)
    return out[:, width:].numpy()


@pytest.fixture(scope="module")
def longrope_model(tmp_path_factory):
    """GQA + sliding window + LongRoPE switching at 64 tokens."""
    directory = tmp_path_factory.mktemp("longrope")
    hf = make_hf_model(directory, num_key_value_heads=2, sliding_window=24, original_max_position_embeddings=64,
                       rope_parameters=longrope_parameters(16))
    cfg, params = load_hf(directory)
    return hf, cfg, params


@pytest.mark.torch
def test_greedy_batch_of_different_lengths_crossing_the_longrope_switch_matches_hf(longrope_model):
    hf, cfg, params = longrope_model
    rs = np.random.RandomState(0)
    # Longest prompt 40 + 40 new tokens crosses original_max_position_embeddings (64) mid-generation:
    # HF then re-prefills with the long factors, and so must we.
    prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (40, 17, 33)]
    ours = generate(params, cfg, prompts, max_new_tokens=40, stop_tokens=[EOS])
    expected = hf_greedy(hf, prompts, 40)
    np.testing.assert_array_equal(ours.tokens, expected)


@pytest.mark.torch
def test_greedy_prompt_already_past_the_switch_matches_hf(longrope_model):
    hf, cfg, params = longrope_model
    prompts = [np.random.RandomState(1).randint(3, cfg.vocab_size, 70).tolist()]
    np.testing.assert_array_equal(generate(params, cfg, prompts, max_new_tokens=32, stop_tokens=[EOS]).tokens,
                                  hf_greedy(hf, prompts, 32))


@pytest.mark.torch
def test_greedy_plain_model_matches_hf_for_48_tokens(tmp_path):
    hf = make_hf_model(tmp_path, seed=3)
    cfg, params = load_hf(tmp_path)
    prompts = [np.random.RandomState(2).randint(3, cfg.vocab_size, 9).tolist()]
    np.testing.assert_array_equal(generate(params, cfg, prompts, max_new_tokens=48, stop_tokens=[EOS]).tokens,
                                  hf_greedy(hf, prompts, 48))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_hf_dir(directory, seed=1)
    return load_hf(directory)


def test_rows_stop_at_their_stop_token_and_pad_afterwards(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7], [9, 10]]
    free = generate(params, cfg, prompts, max_new_tokens=12, stop_tokens=[])
    row0 = free.tokens[0].tolist()
    stop = row0[3]  # make a token row 0 produces a stop token
    first = row0.index(stop)
    out = generate(params, cfg, prompts, max_new_tokens=12, stop_tokens=[stop])
    assert out.tokens[0, :first + 1].tolist() == row0[:first + 1] and out.lengths[0] == first + 1
    assert (out.tokens[0, out.lengths[0]:] == cfg.pad_token_id).all()
    assert out.to_lists()[0][-1] == stop


def test_output_rows_decode_as_they_are(tiny, phi3_vocab):
    """out[i] / iterating give each row's new ids without padding, so tokenizer.decode(out[0]) is the
    text (it used to get the whole padded [B, T] array); a batch handed to decode is a clear error."""
    from phi3jax.tokenizer import Tokenizer, TokenizerError

    cfg, params = tiny
    stop = generate(params, cfg, [[5, 6, 7]], max_new_tokens=4, stop_tokens=[])[0][1]
    out = generate(params, cfg, [[5, 6, 7], [9, 10]], max_new_tokens=12, stop_tokens=[stop])
    rows = out.to_lists()
    assert len(out) == 2 and list(out) == rows and [out[0], out[1], out[-1]] == [rows[0], rows[1], rows[1]]
    assert len(out[0]) == out.lengths[0] < 12 and all(type(t) is int for t in out[0])  # row 0 stopped: no padding
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    assert tok.decode(out[0]) == tok.decode(out.tokens[0, : out.lengths[0]]) == tok.decode(rows[0])
    for batch in (out, out.tokens, rows):
        with pytest.raises(TokenizerError, match="not a batch: decode each row"):
            tok.decode(batch)
    with pytest.raises(TypeError, match=r"index one row with an int .* out\.tokens"):
        out[0:1]


def test_streaming_callback_sees_every_token_once_in_order(tiny):
    cfg, params = tiny
    seen = [[], []]

    def callback(chunks):
        for row, chunk in enumerate(chunks):
            seen[row].extend(chunk)

    out = generate(params, cfg, [[5, 6, 7], [9]], max_new_tokens=20, stop_tokens=[], chunk_size=3, callback=callback)
    assert seen == out.to_lists()


def test_greedy_tokens_equal_argmax_with_ties_infinities_and_nans():
    """Exact (integer) agreement with numpy's argmax: the first maximum on ties, -inf rows, and the
    first NaN where a row has one (argmax's rule), on rows as long as Phi-3's vocabulary."""
    rows = np.random.default_rng(0).standard_normal((6, 32064)).astype(np.float32)
    rows[1, [7, 300, 31000]] = 50.0  # a three-way tie: the first wins
    rows[2] = -np.inf
    rows[3, [5, 9000]] = np.nan
    rows[4, 12] = np.inf
    rows[5] = rows[5].round(0)  # many equal values below a tied maximum
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(rows)))
    np.testing.assert_array_equal(got, np.argmax(rows, axis=-1))
    assert got.dtype == np.int32


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny):
    cfg, params = tiny
    prompt = [[5, 6, 7, 8]]
    greedy = generate(params, cfg, prompt, max_new_tokens=16, stop_tokens=[]).tokens
    a = generate(params, cfg, prompt, max_new_tokens=16, temperature=1.0, seed=1, stop_tokens=[]).tokens
    b = generate(params, cfg, prompt, max_new_tokens=16, temperature=1.0, seed=1, stop_tokens=[]).tokens
    c = generate(params, cfg, prompt, max_new_tokens=16, temperature=1.0, seed=2, stop_tokens=[]).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        np.testing.assert_array_equal(
            generate(params, cfg, prompt, max_new_tokens=16, temperature=0.8, seed=3, stop_tokens=[], **kwargs).tokens,
            greedy)


def test_bad_generate_arguments_are_clear_errors(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="at least one token"):
        generate(params, cfg, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 512"):
        generate(params, cfg, [[1] * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(params, cfg, [[1, 600]], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate(params, cfg, [[1, 2]], max_new_tokens=4, temperature=1.0, top_p=0.0)


@pytest.mark.torch
def test_inference_params_made_once_match_hf_and_free_the_stacked_copy(longrope_model):
    """GQA (q and kv) through the LongRoPE re-prefill, from per-layer params converted once with donation."""
    hf, cfg, params = longrope_model
    stacked = jax.tree.map(jnp.copy, params)
    prepared = inference_params(stacked, donate=True)
    assert not layers_stacked(prepared) and "kv" in prepared["layers_0"]["attn"]
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(stacked["layers"]))
    assert count_params(prepared) == count_params(params)  # no weight kept twice
    prompts = [np.random.RandomState(4).randint(3, cfg.vocab_size, n).tolist() for n in (40, 21)]  # no early EOS
    np.testing.assert_array_equal(generate(prepared, cfg, prompts, max_new_tokens=36, stop_tokens=[EOS]).tokens,
                                  hf_greedy(hf, prompts, 36))
    assert inference_params(prepared) is prepared  # converting twice is free


def test_stacked_and_per_layer_params_generate_the_same_tokens(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    stacked = generate(params, cfg, prompts, max_new_tokens=10, stop_tokens=[])
    per_layer = generate(inference_params(params), cfg, prompts, max_new_tokens=10, stop_tokens=[])
    np.testing.assert_array_equal(stacked.tokens, per_layer.tokens)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_program_keeps_no_second_copy_of_the_weights(kv_heads):
    """XLA hoists loop-invariant work out of the decode loop: any re-layout of the weights inside it
    (stacking q/k/v, transposing) would become a copy of the layer weights. The one parameter layout
    stores every weight as its matmul reads it, so the decode program's scratch memory stays a small
    fraction of the weights (compiled, not run: any size is cheap)."""
    cfg = Phi3Config.from_hf(dict(BASE_HF_CONFIG, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                  num_key_value_heads=kv_heads))
    prepared = jax.eval_shape(unstack_layers, abstract_params(cfg))
    layer_bytes = sum(x.size * x.dtype.itemsize for k, v in prepared.items() if k.startswith("layers_")
                      for x in jax.tree.leaves(v))
    static = dict(sampling=SamplingParams(), pad_id=0, mesh=None)
    state = jax.eval_shape(lambda p: gen._prefill(p, cfg, jnp.zeros((1, 128), jnp.int32), jnp.array([32]),
                                                  jax.random.key(0), jnp.array([EOS]), jnp.int32(64),
                                                  prompt_width=64, **static), prepared)
    compiled = gen._decode_chunk.lower(prepared, cfg, state, jnp.array([EOS]), jnp.int32(64), jnp.int32(64),
                                       **static).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.1 * layer_bytes
