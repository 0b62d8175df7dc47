"""Public entry points: `flash_attention` and `decode_attention`, dispatched by backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import BlockSizes, gpu_defaults, tpu_defaults

BACKENDS = ("tpu", "gpu")


def target_platform() -> str:
    """The platform being compiled for: the default device's (as set by `jax.default_device`,
    e.g. a compile-only TPU device for ahead-of-time compiles), else JAX's default backend."""
    device = jax.config.jax_default_device
    platform = getattr(device, "platform", None) or (device if isinstance(device, str) else None)
    return platform or jax.default_backend()


def default_backend() -> str:
    """Kernel family for the target platform: 'gpu' on GPUs, else 'tpu' (interpreted on CPU)."""
    return "gpu" if target_platform() in ("gpu", "cuda", "rocm") else "tpu"


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,T,H,D] and k, v [B,S,KV,D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch and head_dim must match: q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads cannot share {k.shape[2]} kv heads")
    if q.shape[3] > 256:
        raise ValueError(f"head_dim {q.shape[3]} is not supported (at most 256)")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | None = None,
                    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                    causal: bool = True, sliding_window: int | None = None, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, backend: str | None = None,
                    interpret=False) -> jax.Array:
    """Flash attention with GQA, causal / sliding-window / segment masks; differentiable.

    q [B, T, H, D]; k, v [B, S, KV, D], KV dividing H (consecutive query heads share a kv
    head). Query t of row b sits at key index q_offset[b] + t (default 0). Any T and S;
    head_dim 64, 96, 128 (any up to 256); bfloat16 or float32. Returns [B, T, H, D].
    A row that sees no key at all returns zeros (the XLA reference returns the mean of V).

    backend: 'tpu' (Mosaic) or 'gpu' (Triton); default from the running platform.
    interpret: run in the Pallas interpreter (CPU); for 'tpu' True means the TPU interpreter
    `pltpu.InterpretParams()` (or pass one, e.g. with detect_races=True) and "hlo" the generic
    interpreter (needed under shard_map over several CPU devices).
    """
    _check(q, k, v)
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    d = q.shape[3]
    group = q.shape[2] // k.shape[2]
    scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    offset = (jnp.zeros((q.shape[0],), jnp.int32) if q_offset is None
              else jnp.asarray(q_offset, jnp.int32).reshape(q.shape[0]))
    if q_segment_ids is not None and kv_segment_ids is None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("kv_segment_ids are needed when query and key lengths differ")
        kv_segment_ids = q_segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass q_segment_ids (and optionally kv_segment_ids), or neither")
    blocks = block_sizes or BlockSizes()
    if backend == "tpu":
        from pallas_kernels.flash_tpu import tpu_flash_attention

        return tpu_flash_attention(q, k, v, offset, q_segment_ids, kv_segment_ids, causal=causal,
                                   window=sliding_window, scale=scale, blocks=blocks.filled(tpu_defaults(d, group)),
                                   interpret=interpret)
    from pallas_kernels.flash_gpu import gpu_flash_attention

    return gpu_flash_attention(q, k, v, offset, q_segment_ids, kv_segment_ids, causal=causal,
                               window=sliding_window, scale=scale, blocks=blocks.filled(gpu_defaults(d, group)),
                               interpret=bool(interpret))


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     sliding_window: int | None = None, sm_scale: float | None = None, block_k: int | None = None,
                     backend: str | None = None, interpret=False) -> jax.Array:
    """One query per row against a heads-major KV cache: q [B, H, D], caches [B, KV, S, D], lengths [B].

    Row b attends to cache positions [max(0, lengths[b] - W), lengths[b]); a row of length
    0 returns zeros. Forward only (generation). Returns [B, H, D] in q's dtype.
    """
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"expected q [B,H,D] and caches [B,KV,S,D]; got {q.shape}, {k_cache.shape}")
    if q.shape[1] % k_cache.shape[1] or q.shape[2] != k_cache.shape[3] or q.shape[0] != k_cache.shape[0]:
        raise ValueError(f"q {q.shape} does not fit caches {k_cache.shape}")
    backend = backend or default_backend()
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    lengths = jnp.asarray(lengths, jnp.int32).reshape(q.shape[0])
    from pallas_kernels import decode

    if backend == "tpu":
        return decode.decode_tpu(q, k_cache, v_cache, lengths, window=sliding_window, scale=scale, block_k=block_k,
                                 interpret=interpret)
    if backend == "gpu":
        return decode.decode_gpu(q, k_cache, v_cache, lengths, window=sliding_window, scale=scale, block_k=block_k,
                                 interpret=bool(interpret))
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
