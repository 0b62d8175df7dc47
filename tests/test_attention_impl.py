"""Attention backends: what the dispatcher picks and why, and that every backend gives the reference's
result. The model gives the same logits and loss gradients with the Pallas kernels (interpreted on
CPU) as with XLA, on 1 and 8 devices.

Tolerances (float32): logits within 1e-4 absolute (observed ~5e-7), gradients within 1e-4 of their
largest entry (observed ~3e-7); a mask or GQA bug moves logits by O(0.1). Backend against the
reference on random q/k/v: 1e-6 forward, 1e-5 gradients (sums of ~300 O(1) terms).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.reference import decode_reference, mha_reference
from phi3jax import model, parallel
from phi3jax.config import Phi3Config
from phi3jax.inference.generate import generate
from phi3jax.ops import attention as A
from phi3jax.ops import cpu_attention as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# head_dim 64 (a kernel size), GQA 2, a window shorter than the sequence, two layers under nn.scan.
CFG = Phi3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512, original_max_position_embeddings=512,
                 sliding_window=24, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)


# ------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize("impl,kind,platform,extra,backend", [
    ("auto", "self", "cpu", {}, "cpu"),
    ("auto", "self", "tpu", {}, "pallas"),
    ("auto", "self", "gpu", {"dtype": jnp.bfloat16}, "cudnn"),
    ("auto", "self", "gpu", {"dtype": jnp.float32}, "pallas"),  # cuDNN's flash attention is 16-bit
    ("auto", "self", "gpu", {"dtype": jnp.bfloat16, "has_segments": True}, "pallas"),  # no packed segments
    ("auto", "decode", "cpu", {}, "xla"),
    ("auto", "decode", "tpu", {}, "pallas"),
    ("auto", "decode", "gpu", {}, "pallas"),
    ("xla", "self", "tpu", {}, "xla"),
    ("pallas", "self", "cpu", {}, "pallas"),
    ("splash", "self", "tpu", {"length": 256}, "splash"),
    ("splash", "self", "tpu", {"length": 200}, "pallas"),  # splash takes multiples of 128 only
    ("cudnn", "decode", "gpu", {}, "pallas"),
])
def test_the_dispatcher_picks_a_backend_for_each_call_and_says_why(impl, kind, platform, extra, backend):
    choice = A.select_backend(impl, kind, platform=platform, **extra)
    assert choice.backend == backend and choice.reason


def test_a_mesh_that_splits_sequences_gets_ring_attention_and_a_multi_device_cpu_mesh_xla():
    devices = np.array(jax.devices()[:1])
    one = jax.sharding.Mesh(devices.reshape(1, 1, 1, 1), parallel.MESH_AXES)
    assert A.select_backend("auto", "self", platform="cpu", mesh=one).backend == "cpu"
    abstract = jax.sharding.AbstractMesh((1, 2, 4, 1), parallel.MESH_AXES)
    assert A.select_backend("pallas", "self", platform="tpu", mesh=abstract).backend == "ring"
    abstract = jax.sharding.AbstractMesh((1, 8, 1, 1), parallel.MESH_AXES)
    assert A.select_backend("auto", "self", platform="cpu", mesh=abstract).backend == "xla"


@pytest.mark.parametrize("impl,platform", [("splash", "gpu"), ("cudnn", "cpu"), ("cudnn", "tpu"), ("cpu", "tpu"),
                                           ("nope", "cpu")])
def test_an_impl_that_cannot_run_fails_with_the_reason(impl, platform):
    with pytest.raises(ValueError, match="attention_impl"):
        A.select_backend(impl, "self", platform=platform)


def test_each_decision_is_logged_once(caplog):
    A._logged.clear()
    q = jnp.ones((1, 8, 2, 16))
    with caplog.at_level(logging.INFO, logger="phi3jax.ops.attention"):
        for _ in range(3):
            A.attention(q, q, q)
    assert sum("-> cpu" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------ backends vs the reference
@pytest.mark.parametrize("grouped", [False, True], ids=["all-pairs", "pair-groups"])
@pytest.mark.parametrize("t", [33, 300])
def test_cpu_backend_equals_the_reference_forward_and_gradients(monkeypatch, grouped, t):
    """The CPU schedule (per-pair tiles forward, flash backward) against jax.grad of the reference, with
    GQA, a sliding window and two packed segments; 300 tokens span several tiles. "pair-groups": a
    score budget so small that the backward takes the (batch, kv head) pairs one group at a time, as
    it does for long sequences."""
    if grouped:
        monkeypatch.setattr(C, "_BACKWARD_TILE_BYTES", 1)
    rs = np.random.RandomState(0)
    b, h, kv, d, window = 2, 8, 2, 16, (7 if t < 100 else 150)
    q, k, v, w = (jnp.asarray(rs.randn(*shape), jnp.float32)
                  for shape in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)))
    split = 2 * t // 3
    segments = jnp.asarray(np.repeat([[1] * split + [2] * (t - split)], b, 0))

    def ref(q, k, v):
        return mha_reference(q, k, v, q_segment_ids=segments, causal=True, sliding_window=window)

    def ours(q, k, v):
        return C.cpu_attention(q, k, v, segments, window)

    np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=1e-6)
    expected = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_cpu_backend_in_bfloat16_stays_within_bfloat16_error_of_float32():
    """bfloat16 inputs (float32 softmax inside): outputs within 3e-2 of the float32 result, the
    size of a few bfloat16 roundings (2^-8 relative) of O(1) values; and the output keeps bfloat16."""
    rs = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rs.randn(1, 200, 4, 32), jnp.float32) for _ in range(3))
    exact = C.cpu_attention(q, k, v, None, None)
    low = C.cpu_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None, None)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), exact, atol=3e-2)


def test_decode_against_the_heads_major_cache_equals_attention_at_that_offset():
    """The decode reference reads the [B, KV, S, D] cache in place; it equals the general reference
    run at each row's offset on the same keys laid out [B, S, KV, D]."""
    rs = np.random.RandomState(2)
    b, s, h, kv, d = 2, 50, 4, 2, 16
    q = jnp.asarray(rs.randn(b, h, d), jnp.float32)
    k, v = (jnp.asarray(rs.randn(b, kv, s, d), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([7, 50])
    got = decode_reference(q, k, v, lengths, sliding_window=20)
    want = mha_reference(q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_offset=lengths - 1,
                         sliding_window=20)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_splash_impl_matches_the_reference():
    """JAX's splash kernel (interpreted) behind our signature: scale, GQA, window, segments."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, 256, 4, 64))
    k, v = (jax.random.normal(key, (1, 256, 2, 64)) for key in ks[1:])
    seg = jnp.asarray([[1] * 100 + [2] * 156], jnp.int32)
    out = A.attention(q, k, v, segment_ids_bt=seg, sliding_window=60, impl="splash")
    np.testing.assert_allclose(out, mha_reference(q, k, v, q_segment_ids=seg, sliding_window=60), atol=1e-5)


# ------------------------------------------------------------------------------ the model
def _loss_and_logits(params, cfg, tokens, segments):
    logits = model.logits_fn(params, cfg, tokens, segment_ids=segments)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits


@pytest.mark.parametrize("impl", ["pallas", "cpu"])
def test_model_with_each_backend_matches_xla_logits_and_gradients(impl):
    params = model.init_params(CFG, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, CFG.vocab_size)
    segments = jnp.asarray([[1] * 25 + [2] * 15, [1] * 33 + [0] * 7], jnp.int32)  # packed docs; padding
    grad_fn = jax.jit(jax.value_and_grad(_loss_and_logits, has_aux=True), static_argnums=1)
    (loss_x, logits_x), grads_x = grad_fn(params, CFG.replace(attention_impl="xla"), tokens, segments)
    (loss_p, logits_p), grads_p = grad_fn(params, CFG.replace(attention_impl=impl), tokens, segments)
    np.testing.assert_allclose(logits_p, logits_x, atol=1e-4)
    assert abs(float(loss_p - loss_x)) < 1e-5
    for path, g_p in jax.tree_util.tree_leaves_with_path(grads_p):
        g_x = grads_x
        for key in path:
            g_x = g_x[key.key]
        scale = float(jnp.max(jnp.abs(g_x)))
        assert float(jnp.max(jnp.abs(g_p - g_x))) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_generate_with_pallas_uses_the_decode_kernel_and_matches_xla(monkeypatch):
    calls = []
    real = pallas_kernels.decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(pallas_kernels, "decode_attention", spy)
    params = model.init_params(CFG, 0)
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9]]  # different lengths: per-row cache positions
    want = generate(params, CFG, prompts, max_new_tokens=6)
    got = generate(params, CFG.replace(attention_impl="pallas"), prompts, max_new_tokens=6)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert calls and all(shape == (2, CFG.num_attention_heads, CFG.head_dim) for shape in calls)


def test_model_with_pallas_on_8_devices_with_fsdp_and_tensor_axes_matches_xla():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_pallas_mesh_worker.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["kernel_inside_shard_map"]
    assert result["grads_sharded"]
    assert result["logits_max_abs_diff"] < 1e-4
    assert result["loss_diff"] < 1e-5
    assert result["grad_max_rel_diff"] < 1e-4
