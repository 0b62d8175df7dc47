"""Attention: one reference, named backends, and one place that decides between them.

Two kinds of call, one entry point each:

    attention(q, k, v, ...)                               self-attention over the same tokens
                                                          (training, prefill, scoring)
    decode_attention(q, k_cache, v_cache, lengths, ...)   each row's one new query against its
                                                          cache (generation)

Backends (`Phi3Config.attention_impl` names one, or `auto`):

    xla     the reference (`pallas_kernels.reference`): plain XLA ops, autodiff backward
    cpu     the CPU schedule (`phi3jax.ops.cpu_attention`): causal self-attention on one CPU device
    pallas  our Pallas kernels (`pallas_kernels`): flash attention (TPU Mosaic, GPU Triton), decode
    splash  JAX's TPU splash kernel (self-attention, lengths a multiple of 128)
    cudnn   cuDNN's flash attention (`jax.nn.dot_product_attention`, NVIDIA GPU, 16-bit)
    ring    ring attention (`phi3jax.ops.ring_attention`), whenever the mesh splits sequences

`select_backend` is the one place that decides, from the requested impl, the platform, the mesh
(passed in explicitly; nothing is read from ambient state) and what the call needs. It logs once
per decision what it chose and why. Under a mesh the kernels run per device inside shard_map,
over the batch and head axes the logical rules give.

Masks are described, not materialised by the caller: causal, Phi-3's sliding window (W keys,
the query's own included) and segment ids (packed documents; padding gets a segment of its own).
GQA: consecutive query heads share a kv head; nothing repeats K and V in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels.ops import target_platform
from pallas_kernels.reference import decode_reference, mha_reference
from phi3jax.config import ATTENTION_IMPLS
from phi3jax.ops.cpu_attention import cpu_attention
from phi3jax.ops.ring_attention import SEQUENCE_AXIS, ring_attention
from phi3jax.parallel.axes import ACT_HEADS, BATCH, mesh_axes, rules_for

_logger = logging.getLogger(__name__)
_logged: set[tuple[str, ...]] = set()


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one kind of attention call runs, and why."""

    backend: str  # xla | cpu | pallas | splash | cudnn | ring
    reason: str


def platform_of(mesh: Any = None) -> str:
    """'cpu', 'tpu' or 'gpu': the platform of the mesh's devices, else of the default device
    (`jax.default_device`, e.g. a compile-only TPU device for an ahead-of-time compile)."""
    platform = None
    if mesh is not None and isinstance(mesh, jax.sharding.Mesh):
        platform = mesh.devices.flat[0].platform
    platform = platform or target_platform()
    return "gpu" if platform in ("cuda", "rocm") else platform


def select_backend(impl: str, kind: str, *, platform: str, mesh: Any = None, length: int = 0,
                   has_segments: bool = False, dtype: Any = jnp.float32) -> Choice:
    """The backend for one kind of call ('self' or 'decode') of the requested `impl`.

    An impl that cannot run on the platform at all is an error naming the reason; one that cannot
    take this particular call falls back (pallas), and says so once.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is unknown; use one of {ATTENTION_IMPLS}")
    accelerator = platform in ("tpu", "gpu")
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU (running on {platform}); "
                         "use 'auto', 'pallas' or 'xla'")
    if impl == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"attention_impl='splash' is a TPU kernel and cannot run on {platform}; "
                         "use 'pallas', 'cudnn' or 'auto'")
    if impl == "cpu" and platform != "cpu":
        raise ValueError(f"attention_impl='cpu' is the CPU schedule and cannot run on {platform}; use 'auto'")
    sequence = dict(mesh.shape).get(SEQUENCE_AXIS, 1) if mesh is not None else 1
    if kind == "self" and sequence > 1:
        return Choice("ring", f"mesh.sequence={sequence} splits sequences: ring attention (its blocks in XLA)")
    if kind == "decode":
        if impl in ("xla", "cpu") or (impl == "auto" and not accelerator):
            return Choice("xla", "one query per row: the reference reads the heads-major cache in place")
        interpreted = "" if accelerator else " (interpreted on CPU: slow, for tests)"
        return Choice("pallas", f"one query per row against the cache: the Pallas decode kernel{interpreted}")
    single_device = mesh is None or mesh.size == 1
    if impl == "auto":
        if platform == "cpu":
            if single_device:
                return Choice("cpu", "on one CPU device: the cache-tiled CPU schedule")
            return Choice("xla", "on a multi-device CPU mesh: XLA's partitioned reference")
        if platform == "gpu" and _cudnn_supports(has_segments, dtype):
            return Choice("cudnn", "NVIDIA GPU, 16-bit, no packed segments: cuDNN's flash attention")
        why = "packed segments" if has_segments else f"{jnp.dtype(dtype).name}"
        return Choice("pallas", f"{platform}: our Pallas flash kernel" + (f" (cuDNN cannot take {why})"
                                                                           if platform == "gpu" else ""))
    if impl == "splash" and (length % 128 or not length):
        return Choice("pallas", f"splash needs lengths that are multiples of 128 (got {length}): the Pallas kernel")
    if impl == "cudnn" and not _cudnn_supports(has_segments, dtype):
        return Choice("pallas", "cuDNN cannot take packed segments or float32 here: the Pallas kernel")
    interpreted = " (interpreted on CPU: slow, for tests)" if impl in ("pallas", "splash") and not accelerator else ""
    return Choice(impl, f"attention_impl={impl!r}{interpreted}")


def _cudnn_supports(has_segments: bool, dtype: Any) -> bool:
    return not has_segments and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _log(impl: str, kind: str, choice: Choice) -> None:
    key = (impl, kind, choice.backend, choice.reason)
    if key not in _logged:
        _logged.add(key)
        level = logging.WARNING if "cannot" in choice.reason or "interpreted" in choice.reason else logging.INFO
        _logger.log(level, f"attention ({kind}) attention_impl={impl} -> {choice.backend}: {choice.reason}")


def _interpret(platform: str, mesh: Any) -> Any:
    """How the kernels run here: compiled on an accelerator; on CPU the TPU interpreter on one
    device, Pallas' generic interpreter under a mesh (the TPU one cannot run inside a
    multi-device shard_map)."""
    if platform != "cpu":
        return False
    return True if mesh is None or mesh.size == 1 else "hlo"


def _kernel_axes(mesh: Any, kv_heads: int) -> dict[str, tuple[str, ...]]:
    rules = rules_for(kv_heads, mesh)
    return dict(batch_axes=mesh_axes(BATCH, rules), head_axes=mesh_axes(ACT_HEADS, rules))


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *, segment_ids_bt: jax.Array | None = None,
              causal: bool = True, sliding_window: int | None = None, impl: str = "auto", mesh: Any = None
              ) -> jax.Array:
    """Self-attention: q [B, T, H, D] against k, v [B, T, KV, D] of the same tokens -> [B, T, H, D].

    segment_ids_bt [B, T]: tokens attend only within their segment. mesh: the Mesh the arrays
    are laid out on (None: one device), which decides sharding-aware backends.
    """
    if q_bthd.shape[2] % k_bskd.shape[2]:
        raise ValueError(f"{q_bthd.shape[2]} query heads cannot share {k_bskd.shape[2]} kv heads")
    platform = platform_of(mesh)
    choice = select_backend(impl, "self", platform=platform, mesh=mesh, length=q_bthd.shape[1],
                            has_segments=segment_ids_bt is not None, dtype=q_bthd.dtype)
    _log(impl, "self", choice)
    masks = dict(causal=causal, sliding_window=sliding_window)
    if choice.backend == "ring":
        return ring_attention(q_bthd, k_bskd, v_bskd, mesh=mesh, rules=rules_for(k_bskd.shape[2], mesh),
                              segment_ids_bt=segment_ids_bt, **masks)
    if choice.backend == "xla":
        return mha_reference(q_bthd, k_bskd, v_bskd, q_segment_ids=segment_ids_bt, **masks)
    if choice.backend == "cpu":
        if not causal:
            return mha_reference(q_bthd, k_bskd, v_bskd, q_segment_ids=segment_ids_bt, **masks)
        return cpu_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt, sliding_window)
    interpret = _interpret(platform, mesh)
    if choice.backend == "cudnn":
        fn = functools.partial(_cudnn, **masks)
    elif choice.backend == "splash":
        fn = functools.partial(_splash, **masks, interpret=interpret)
    else:
        fn = functools.partial(pk.flash_attention, **masks, backend="gpu" if platform == "gpu" else "tpu",
                               interpret=interpret)
    if mesh is None:
        return fn(q_bthd, k_bskd, v_bskd, q_segment_ids=segment_ids_bt)
    return pk.sharded_flash_attention(q_bthd, k_bskd, v_bskd, mesh=mesh, q_segment_ids=segment_ids_bt,
                                      attention_fn=fn, **_kernel_axes(mesh, k_bskd.shape[2]))


def decode_attention(q_bhd: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths_b: jax.Array, *,
                     sliding_window: int | None = None, impl: str = "auto", mesh: Any = None) -> jax.Array:
    """One new query per row, q [B, H, D], against that row's cached keys and values
    (heads-major, [B, KV, S, D]; `phi3jax.ops.kv_cache`): row b sees positions
    [max(0, lengths_b[b] - W), lengths_b[b]). Returns [B, H, D]."""
    platform = platform_of(mesh)
    choice = select_backend(impl, "decode", platform=platform, mesh=mesh)
    _log(impl, "decode", choice)
    if choice.backend == "xla":
        return decode_reference(q_bhd, k_cache, v_cache, lengths_b, sliding_window=sliding_window)
    kw = dict(sliding_window=sliding_window, backend="gpu" if platform == "gpu" else "tpu",
              interpret=_interpret(platform, mesh))
    if mesh is None:
        return pk.decode_attention(q_bhd, k_cache, v_cache, lengths_b, **kw)
    return pk.sharded_decode_attention(q_bhd, k_cache, v_cache, lengths_b, mesh=mesh,
                                       **_kernel_axes(mesh, k_cache.shape[1]), **kw)


# ------------------------------------------------------------------------------ JAX's kernels
def _splash(q_bthd, k_bskd, v_bskd, *, q_offset=None, q_segment_ids=None, kv_segment_ids=None, causal=True,
            sliding_window=None, interpret=False):
    """JAX's splash attention (TPU) behind the kernels' signature: [B, T, H, D] in and out."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    del q_offset  # self-attention only (select_backend)
    b, t, h, d = q_bthd.shape
    s = k_bskd.shape[1]
    block = next(size for size in (512, 256, 128) if t % size == 0 and s % size == 0)
    if sliding_window is not None:
        one = sa.LocalMask((t, s), window_size=(sliding_window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = sa.CausalMask((t, s))
    else:
        one = sa.FullMask((t, s))
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([one] * h), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                interpret=bool(interpret))
    q = (q_bthd * jnp.asarray(d ** -0.5, q_bthd.dtype)).transpose(0, 2, 1, 3)
    k, v = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    if q_segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        segs = sa.SegmentIds(q=q_segment_ids.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
        out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(q, k, v, segs)
    return out.transpose(0, 2, 1, 3).astype(v_bskd.dtype)


def _cudnn(q_bthd, k_bskd, v_bskd, *, q_offset=None, q_segment_ids=None, kv_segment_ids=None, causal=True,
           sliding_window=None):
    """cuDNN's flash attention (jax.nn.dot_product_attention) behind the kernels' signature."""
    del q_offset, q_segment_ids, kv_segment_ids  # select_backend routes calls with them elsewhere
    window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window)
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")
