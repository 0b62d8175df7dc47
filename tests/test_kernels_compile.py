"""The kernels compiled for real targets without the hardware.

TPU: libtpu's compiler via `jax.experimental.topologies` compiles every Pallas kernel
(Mosaic) ahead of time for v5e, v5p and v6e, for the variants the model can select: each
preset's head_dim / GQA group / sliding window, with and without segment ids, bf16 and f32,
forward + backward, the prefill-into-cache call, the decode kernel, and the model's train
step with attention_impl=pallas. Mosaic rejects shapes and layouts the interpreter accepts
(see the first test), so this is the check that the kernels would run on a TPU.

GPU: `export_for_cuda` (`jax.export(..., platforms=["cuda"])` for an abstract GPU device) runs
the Pallas -> Triton lowering of the same variants on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_attention, flash_attention
from pallas_kernels.aot import TOPOLOGIES, compile_for_tpu, cost, export_for_cuda, libtpu_available, triton_calls
from phi3jax.config import Phi3Config

needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason="libtpu is not installed (pip install -e .[dev])")

# (preset, heads, kv heads, head_dim, window at training length 1024): what each model selects.
PRESETS = {
    "phi-3-mini-4k": (32, 32, 96, 2047),
    "phi-3-medium-4k": (40, 10, 128, 2047),
    "phi-4-mini": (24, 8, 128, 262144),
    "tiny": (4, 2, 64, None),
}
SEQ = 1024


def _flash_grad_fn(window, segments, backend=None):
    def loss(q, k, v, seg):
        out = flash_attention(q, k, v, q_segment_ids=seg if segments else None, causal=True, sliding_window=window,
                              backend=backend)
        return out.astype(jnp.float32).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _flash_args(preset, dtype, batch=1, seq=SEQ):
    h, kv, d, _ = PRESETS[preset]
    return [jax.ShapeDtypeStruct((batch, seq, h, d), dtype), jax.ShapeDtypeStruct((batch, seq, kv, d), dtype),
            jax.ShapeDtypeStruct((batch, seq, kv, d), dtype), jax.ShapeDtypeStruct((batch, seq), jnp.int32)]


def _mosaic_calls(compiled) -> int:
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


@needs_libtpu
def test_aot_compile_rejects_what_the_interpreter_accepts():
    """A lane-crossing reshape runs in the TPU interpreter but Mosaic cannot lay it out: proof
    that these compiles really run the Mosaic compiler."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...].reshape(4, 288)

    def bad(x, interpret=False):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((4, 288), x.dtype), interpret=interpret)(x)

    bad(jnp.ones((12, 96)), interpret=pltpu.InterpretParams())
    with pytest.raises(Exception, match="Mosaic"):
        compile_for_tpu(bad, [jax.ShapeDtypeStruct((12, 96), jnp.float32)])


# Default run: every preset once on v5e (covering bf16 / f32 and segments / none), one preset on
# v5p and v6e. The full product is marked slow.
DEFAULT_FLASH = [("v5e:2x2", "phi-3-mini-4k", "bfloat16", True), ("v5e:2x2", "phi-3-medium-4k", "bfloat16", False),
                 ("v5e:2x2", "phi-4-mini", "float32", True), ("v5e:2x2", "tiny", "float32", False),
                 ("v5p:2x2x1", "phi-3-mini-4k", "bfloat16", True), ("v6e:2x2", "phi-3-medium-4k", "bfloat16", True)]
SLOW_FLASH = [(t, p, dt, seg) for t in TOPOLOGIES for p in PRESETS for dt in ("bfloat16", "float32")
              for seg in (False, True) if (t, p, dt, seg) not in DEFAULT_FLASH]


def _check_flash_compiles(topology, preset, dtype, segments):
    window = PRESETS[preset][3]
    compiled = compile_for_tpu(_flash_grad_fn(window, segments), _flash_args(preset, jnp.dtype(dtype)), topology)
    assert _mosaic_calls(compiled) == 3  # forward, dq, dk/dv: all Mosaic kernels


@needs_libtpu
@pytest.mark.parametrize("topology,preset,dtype,segments", DEFAULT_FLASH)
def test_flash_forward_backward_compiles_for_tpu(topology, preset, dtype, segments):
    _check_flash_compiles(topology, preset, dtype, segments)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology,preset,dtype,segments", SLOW_FLASH)
def test_flash_forward_backward_compiles_for_tpu_all(topology, preset, dtype, segments):
    _check_flash_compiles(topology, preset, dtype, segments)


def _decode_fn(window, backend=None):
    return lambda q, k, v, lengths: decode_attention(q, k, v, lengths, sliding_window=window, backend=backend)


def _decode_args(preset, dtype, batch=4, cache=2048):
    """q [B, H, D]; the heads-major caches [B, KV, S, D]; lengths [B]."""
    h, kv, d, _ = PRESETS[preset]
    return [jax.ShapeDtypeStruct((batch, h, d), dtype), jax.ShapeDtypeStruct((batch, kv, cache, d), dtype),
            jax.ShapeDtypeStruct((batch, kv, cache, d), dtype), jax.ShapeDtypeStruct((batch,), jnp.int32)]


# Every preset on v5e, Phi-3-mini on v5p and v6e.
DECODE_CASES = [("v5e:2x2", p) for p in PRESETS] + [(t, "phi-3-mini-4k") for t in TOPOLOGIES if t != "v5e:2x2"]


@needs_libtpu
@pytest.mark.parametrize("topology,preset", DECODE_CASES)
def test_decode_and_prefill_compile_for_tpu(topology, preset):
    dtype = jnp.bfloat16
    window = PRESETS[preset][3]
    compiled = compile_for_tpu(_decode_fn(window), _decode_args(preset, dtype), topology)
    assert _mosaic_calls(compiled) == 1
    # Prefill into the cache: 512 prompt tokens at offset 0 against a 2048-long cache.
    h, kv, d, _ = PRESETS[preset]

    def prefill(q, k, v, offset):
        return flash_attention(q, k, v, q_offset=offset, sliding_window=window)

    args = [jax.ShapeDtypeStruct((2, 512, h, d), dtype), jax.ShapeDtypeStruct((2, 2048, kv, d), dtype),
            jax.ShapeDtypeStruct((2, 2048, kv, d), dtype), jax.ShapeDtypeStruct((2,), jnp.int32)]
    assert _mosaic_calls(compile_for_tpu(prefill, args, topology)) == 1


@needs_libtpu
def test_window_skips_blocks_in_compiled_cost():
    """The compiled kernels' cost (what XLA schedules by) shrinks with the window: blocks outside
    it are not computed. Causal without window ~ half of non-causal; window 512 of 8192 ~ 1/8."""
    args = [jax.ShapeDtypeStruct((1, 8192, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 8192, 8, 128),
                                                                                        jnp.bfloat16)]

    def flops(causal, window):
        fn = lambda q, k: flash_attention(q, k, k, causal=causal, sliding_window=window)  # noqa: E731
        return cost(compile_for_tpu(fn, args))["flops"]

    full, causal, local = flops(False, None), flops(True, None), flops(True, 512)
    assert 0.45 < causal / full < 0.6
    assert local / full < 0.15


@needs_libtpu
def test_model_train_step_compiles_for_tpu_with_pallas():
    """value_and_grad of the model's next-token loss, attention_impl=pallas, packed sequences."""
    from phi3jax import model

    cfg = Phi3Config.preset("tiny", dtype="bfloat16", sliding_window=300, attention_impl="pallas",
                            num_hidden_layers=2)
    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)

    def train_step(params, tokens, segments):
        def loss(params):
            logits = model.logits_fn(params, cfg, tokens, segment_ids=segments)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        return jax.value_and_grad(loss)(params)

    compiled = compile_for_tpu(train_step, [model.abstract_params(cfg), tokens, tokens])
    assert _mosaic_calls(compiled) == 3


# ------------------------------------------------------------------------------ CUDA export
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("dtype,segments", [("bfloat16", True), ("float32", False)])
def test_flash_forward_backward_exports_for_cuda(preset, dtype, segments):
    window = PRESETS[preset][3]
    exported = export_for_cuda(_flash_grad_fn(window, segments, backend="gpu"), _flash_args(preset, jnp.dtype(dtype)))
    assert exported.platforms == ("cuda",)
    assert triton_calls(exported) == 3  # forward, dq, dk/dv: all Triton kernels


@pytest.mark.parametrize("preset", list(PRESETS))
def test_decode_exports_for_cuda(preset):
    window = PRESETS[preset][3]
    exported = export_for_cuda(_decode_fn(window, backend="gpu"), _decode_args(preset, jnp.bfloat16))
    assert exported.platforms == ("cuda",)
    assert triton_calls(exported) == 1
