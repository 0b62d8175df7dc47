"""attention_impl wiring: what each choice runs, and that the model gives the same logits and
loss gradients with the Pallas kernels (interpreted on CPU) as with XLA, on 1 and 8 devices.

Tolerances (float32 model): logits within 1e-4 absolute (observed ~5e-7), gradients within
1e-4 of their largest entry (observed ~3e-7); a mask or GQA bug moves logits by O(0.1).
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
from phi3jax import attention as attn
from phi3jax import model
from phi3jax.config import Phi3Config
from phi3jax.generate import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# head_dim 64 (a kernel size), GQA 2, a window shorter than the sequence, two layers under nn.scan.
CFG = Phi3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512, original_max_position_embeddings=512,
                 sliding_window=24, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)


def test_auto_picks_xla_on_cpu_and_the_kernels_on_accelerators_and_says_why(caplog):
    attn._logged.clear()
    with caplog.at_level(logging.INFO, logger="phi3jax.attention"):
        assert attn.resolve_impl("auto", "cpu") == "xla"
        assert attn.resolve_impl("auto", "tpu") == "pallas"
        assert attn.resolve_impl("auto", "gpu") == "pallas"
        assert attn.resolve_impl("auto", "cpu") == "xla"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("auto -> xla" in m for m in messages) == 1  # once, not per call
    assert any("auto -> pallas" in m and "tpu" in m for m in messages)


@pytest.mark.parametrize("impl,platform", [("splash", "gpu"), ("cudnn", "cpu"), ("cudnn", "tpu"), ("nope", "cpu")])
def test_an_impl_that_cannot_run_fails_with_the_reason(impl, platform):
    with pytest.raises(ValueError, match="attention_impl"):
        attn.resolve_impl(impl, platform)


@pytest.mark.parametrize("impl", ["pallas", "splash", "cudnn"])
def test_explicit_impls_are_kept_where_they_run(impl):
    platform = "gpu" if impl == "cudnn" else "tpu"
    assert attn.resolve_impl(impl, platform) == impl


def test_splash_impl_matches_xla():
    """JAX's splash kernel (interpreted) behind our signature: scale, GQA, window, segments."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, 256, 4, 64))
    k, v = (jax.random.normal(key, (1, 256, 2, 64)) for key in ks[1:])
    seg = jnp.asarray([[1] * 100 + [2] * 156], jnp.int32)
    kw = dict(q_segment_ids_bt=seg, causal=True, sliding_window=60)
    out = attn.attention(q, k, v, impl="splash", **kw)
    np.testing.assert_allclose(out, attn.xla_attention(q, k, v, **kw), atol=1e-5)


def _loss_and_logits(params, cfg, tokens, segments):
    logits = model._forward(params, cfg, tokens, None, segments, None)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits


def test_model_with_pallas_matches_xla_logits_and_gradients():
    params = model.init_params(CFG, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, CFG.vocab_size)
    segments = jnp.asarray([[1] * 25 + [2] * 15, [1] * 33 + [0] * 7], jnp.int32)  # packed docs; padding
    grad_fn = jax.jit(jax.value_and_grad(_loss_and_logits, has_aux=True), static_argnums=1)
    (loss_x, logits_x), grads_x = grad_fn(params, CFG, tokens, segments)
    (loss_p, logits_p), grads_p = grad_fn(params, CFG.replace(attention_impl="pallas"), tokens, segments)
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
