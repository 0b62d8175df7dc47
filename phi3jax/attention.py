"""The attention entry point: one function, several implementations.

Every caller (the model, training, generation) goes through `attention`. The XLA path
here is the reference; custom kernels plug in behind the same signature and must match it.

Masking is described, not materialised by the caller:
  * `causal`: query i (at index `q_offset + i` of the key sequence) sees keys j <= its index;
  * `sliding_window` W: additionally only keys with index > query index - W (Phi-3's window:
    W keys, itself included);
  * segment ids: a query sees only keys of the same segment (packed documents; padding gets
    its own id so real tokens never attend to it).
GQA: query heads are grouped over kv heads (consecutive query heads share one kv head) with
an einsum, without repeating K and V in memory.

Implementations (`Phi3Config.attention_impl`, see `resolve_impl` and docs/kernels.md): xla
(this file's reference; on one CPU device causal self-attention takes a cache-tiled schedule,
`cpu_tiled_attention`), pallas (`pallas_kernels`: flash attention, and the decode kernel for
one query per row against a cache), splash and cudnn (JAX's kernels, where they fit the call),
auto (pallas on TPU and GPU, xla on CPU). Under a mesh the kernels run inside shard_map.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

# The mask is defined once, next to the kernels it describes.
from pallas_kernels.reference import MASK_VALUE as _MASK_VALUE
from pallas_kernels.reference import reference_mask as attention_mask

# Causal self-attention is computed in at most this many query blocks of at least this size.
_MIN_QUERY_BLOCK, _MAX_QUERY_BLOCKS = 128, 8


def xla_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *,
                  q_offset_b: jax.Array | None = None, q_segment_ids_bt: jax.Array | None = None,
                  kv_segment_ids_bs: jax.Array | None = None, causal: bool = True,
                  sliding_window: int | None = None, kv_heads_major: bool = False) -> jax.Array:
    """Reference attention in plain XLA ops: float32 logits and softmax, GQA by einsum.

    kv_heads_major: k is [B, KV, S, D] and v [B, KV, D, S] (the XLA decode cache layout, see
    `phi3jax.model.kv_cache_heads_major`) instead of both [B, S, KV, D].
    """
    b, t, h, d = q_bthd.shape
    if kv_heads_major:
        kv_heads, s = k_bskd.shape[1], k_bskd.shape[2]
        mask_bts = attention_mask(t, s, q_offset=q_offset_b, q_segment_ids=q_segment_ids_bt,
                                  kv_segment_ids=kv_segment_ids_bs, causal=causal, sliding_window=sliding_window)
        q_btkgd = q_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
        logits_bkgts = jnp.einsum("btkgd,bksd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
        logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts * d ** -0.5, _MASK_VALUE)
        probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskd.dtype)
        return jnp.einsum("bkgts,bkds->btkgd", probs_bkgts, v_bskd).reshape(b, t, h, d)
    s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
    self_attention = causal and q_offset_b is None and kv_segment_ids_bs is None and t == s
    if self_attention and _single_cpu_device():
        return cpu_tiled_attention(q_bthd, k_bskd, v_bskd, q_segment_ids_bt, sliding_window)
    q_btkgd = q_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
    kv_seg = q_segment_ids_bt if kv_segment_ids_bs is None else kv_segment_ids_bs
    if self_attention and t >= 2 * _MIN_QUERY_BLOCK:
        # Causal self-attention in query blocks: block i only sees keys up to its end (and from
        # its window's start), so the masked-out upper triangle is mostly never computed.
        block = max(_MIN_QUERY_BLOCK, -(-t // _MAX_QUERY_BLOCKS))
        outs = []
        for start in range(0, t, block):
            end = min(start + block, t)
            lo = 0 if sliding_window is None else max(0, start - sliding_window + 1)
            mask = attention_mask(end - start, end - lo, q_offset=jnp.full((b,), start - lo),
                                  q_segment_ids=None if kv_seg is None else q_segment_ids_bt[:, start:end],
                                  kv_segment_ids=None if kv_seg is None else kv_seg[:, lo:end],
                                  causal=True, sliding_window=sliding_window)
            outs.append(_softmax_attention(q_btkgd[:, start:end], k_bskd[:, lo:end], v_bskd[:, lo:end], mask))
        return jnp.concatenate(outs, axis=1).reshape(b, t, h, d)
    mask_bts = attention_mask(t, s, q_offset=q_offset_b, q_segment_ids=q_segment_ids_bt,
                              kv_segment_ids=kv_segment_ids_bs, causal=causal,
                              sliding_window=sliding_window)
    out_btkgd = _softmax_attention(q_btkgd, k_bskd, v_bskd, mask_bts)
    return out_btkgd.reshape(b, t, h, d)


# ---------------------------------------------------------------------------- CPU schedule
# XLA on CPU runs each op of a batched attention over all (batch, head) pairs at once: every
# softmax pass streams [B, H, T, S] scores through memory, one thread per op. The forward below
# takes one (batch, kv head) pair at a time (`lax.map`), so a pair's score tiles stay in cache, and
# runs one independent map per CPU core so the cores work side by side. The backward is
# flash-attention style (recomputes probabilities from the saved log-sum-exp instead of keeping
# [T, S] probabilities) and runs over all pairs at once in larger query tiles: its five matmuls per
# tile are big enough to thread well, and the per-pair loop's many small ops cost more than the
# cache misses (~5% of a CPU training step at 4 x 512 tokens, 8 heads of 64). Long sequences take
# the pairs in groups (a `lax.map`), so one tile's float32 scores stay under _BACKWARD_TILE_BYTES.
# Same math, same mask.
_TILE_Q, _BACKWARD_TILE_Q, _MAX_TILES = 128, 256, 16
_BACKWARD_TILE_BYTES = 32 * 2**20


def _single_cpu_device() -> bool:
    """True when this trace runs on one CPU device (no multi-device mesh to keep sharded)."""
    if _target_platform() != "cpu":
        return False
    mesh = _context_mesh()
    return mesh is None or mesh.size == 1


def _query_tiles(t: int, sliding_window: int | None, tile: int = _TILE_Q) -> list[tuple[int, int, int]]:
    """(first query, end, first visible key) of each query tile of causal self-attention."""
    block = max(tile, -(-t // _MAX_TILES))
    return [(start, min(start + block, t), 0 if sliding_window is None else max(0, start - sliding_window + 1))
            for start in range(0, t, block)]


def _tile_logits(q_gtd, k_sd, seg_t, start, end, lo, sliding_window):
    """Masked float32 logits [..., G, end - start, end - lo] of one query tile (q pre-scaled); any
    leading axes (pairs) are shared by q [..., G, T, D], k [..., S, D] and segment ids [..., T]."""
    logits = jnp.einsum("...gtd,...sd->...gts", q_gtd[..., start:end, :], k_sd[..., lo:end, :],
                        preferred_element_type=jnp.float32)
    q_idx, k_idx = jnp.arange(start, end)[:, None], jnp.arange(lo, end)[None, :]
    mask = k_idx <= q_idx
    if sliding_window is not None:
        mask = mask & (k_idx > q_idx - sliding_window)
    if seg_t is not None:
        mask = mask & (seg_t[..., start:end, None] == seg_t[..., None, lo:end])
    return jnp.where(mask[..., None, :, :], logits, _MASK_VALUE)


def _pair_forward(q_gtd, k_sd, v_sd, seg_t, sliding_window):
    outs, lses = [], []
    for start, end, lo in _query_tiles(q_gtd.shape[1], sliding_window):
        logits = _tile_logits(q_gtd, k_sd, seg_t, start, end, lo, sliding_window)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - row_max)
        row_sum = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("gts,sd->gtd", p.astype(v_sd.dtype), v_sd[lo:end], preferred_element_type=jnp.float32)
        outs.append((out / row_sum).astype(v_sd.dtype))
        lses.append((row_max + jnp.log(row_sum))[..., 0])
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _tiles_backward(q_pgtd, k_psd, v_psd, seg_pt, out_pgtd, lse_pgt, d_out_pgtd, sliding_window):
    """dq, dk, dv of every pair at once ([P, ...] leading), one query tile at a time."""
    f32 = jnp.float32
    delta = jnp.sum(d_out_pgtd.astype(f32) * out_pgtd.astype(f32), axis=-1)
    d_k, d_v = jnp.zeros(k_psd.shape, f32), jnp.zeros(v_psd.shape, f32)
    d_qs = []
    for start, end, lo in _query_tiles(q_pgtd.shape[2], sliding_window, _BACKWARD_TILE_Q):
        logits = _tile_logits(q_pgtd, k_psd, seg_pt, start, end, lo, sliding_window)
        p = jnp.exp(logits - lse_pgt[..., start:end, None])
        d_out = d_out_pgtd[:, :, start:end]
        d_v = d_v.at[:, lo:end].add(jnp.einsum("pgts,pgtd->psd", p.astype(v_psd.dtype), d_out.astype(v_psd.dtype),
                                               preferred_element_type=f32))
        d_p = jnp.einsum("pgtd,psd->pgts", d_out, v_psd[:, lo:end], preferred_element_type=f32)
        d_s = (p * (d_p - delta[..., start:end, None])).astype(q_pgtd.dtype)
        d_qs.append(jnp.einsum("pgts,psd->pgtd", d_s, k_psd[:, lo:end], preferred_element_type=f32))
        d_k = d_k.at[:, lo:end].add(jnp.einsum("pgts,pgtd->psd", d_s, q_pgtd[:, :, start:end],
                                               preferred_element_type=f32))
    return jnp.concatenate(d_qs, axis=2), d_k, d_v


def _map_pairs(fn, args, n_pairs: int):
    """fn over the leading (pair) axis of every arg: one `lax.map` per CPU core, side by side."""
    cores = min(n_pairs, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    groups = max(g for g in range(1, cores + 1) if n_pairs % g == 0)
    size = n_pairs // groups
    parts = [jax.lax.map(lambda a: fn(*a), jax.tree.map(lambda x, i=i: x[i * size:(i + 1) * size], args))
             for i in range(groups)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def _to_pairs(q_bthd, k_bskd, v_bskd, seg_bt):
    """[B, T, H, D] -> per (batch, kv head): q [P, G, T, D], k and v [P, S, D], segment ids [P, T]."""
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    scale = jnp.asarray(d ** -0.5, q_bthd.dtype)
    q = (q_bthd * scale).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, h // kv, t, d)
    k, v = (x.transpose(0, 2, 1, 3).reshape(b * kv, t, d) for x in (k_bskd, v_bskd))
    seg = None if seg_bt is None else jnp.repeat(seg_bt, kv, axis=0)
    return q, k, v, seg


def _from_pairs(x_pgtd, shape):
    b, t, h, d = shape
    return x_pgtd.reshape(b, -1, x_pgtd.shape[1], t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cpu_tiled_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, segment_ids_bt: jax.Array | None,
                        sliding_window: int | None) -> jax.Array:
    """Causal self-attention scheduled for CPU caches and cores (see above); same result as the reference."""
    return _tiled_forward(q_bthd, k_bskd, v_bskd, segment_ids_bt, sliding_window)[0]


def _tiled_forward(q_bthd, k_bskd, v_bskd, segment_ids_bt, sliding_window):
    q, k, v, seg = _to_pairs(q_bthd, k_bskd, v_bskd, segment_ids_bt)
    out, lse = _map_pairs(lambda *a: _pair_forward(*a, sliding_window), (q, k, v, seg), q.shape[0])
    return _from_pairs(out, q_bthd.shape), (q_bthd, k_bskd, v_bskd, segment_ids_bt, out, lse)


def _tiled_backward(sliding_window, residuals, d_out_bthd):
    q_bthd, k_bskd, v_bskd, segment_ids_bt, out, lse = residuals
    q, k, v, seg = _to_pairs(q_bthd, k_bskd, v_bskd, segment_ids_bt)
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    d_out = d_out_bthd.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(q.shape)
    tiles = _query_tiles(t, sliding_window, _BACKWARD_TILE_Q)
    pair_tile_bytes = 4 * q.shape[1] * max((end - start) * (end - lo) for start, end, lo in tiles)  # float32 scores
    n_pairs, most = q.shape[0], max(1, _BACKWARD_TILE_BYTES // pair_tile_bytes)
    group = max(g for g in range(1, min(n_pairs, most) + 1) if n_pairs % g == 0)
    args = (q, k, v, seg, out, lse, d_out)
    if group == n_pairs:
        d_q, d_k, d_v = _tiles_backward(*args, sliding_window)
    else:
        grouped = jax.tree.map(lambda x: x.reshape(n_pairs // group, group, *x.shape[1:]), args)
        d_q, d_k, d_v = jax.lax.map(lambda a: _tiles_backward(*a, sliding_window), grouped)
        d_q, d_k, d_v = (x.reshape(n_pairs, *x.shape[2:]) for x in (d_q, d_k, d_v))
    d_q = _from_pairs(d_q * d ** -0.5, q_bthd.shape).astype(q_bthd.dtype)
    d_k, d_v = (x.reshape(b, kv, t, d).transpose(0, 2, 1, 3).astype(k_bskd.dtype) for x in (d_k, d_v))
    return d_q, d_k, d_v, None


cpu_tiled_attention.defvjp(_tiled_forward, _tiled_backward)


def _attention_probs(q_btkgd: jax.Array, k_bskd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    logits_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
    logits_bkgts = logits_bkgts * (q_btkgd.shape[-1] ** -0.5)
    logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, _MASK_VALUE)
    return jax.nn.softmax(logits_bkgts, axis=-1)


@jax.custom_vjp
def _softmax_attention(q_btkgd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    probs_bkgts = _attention_probs(q_btkgd, k_bskd, mask_bts)
    return jnp.einsum("bkgts,bskd->btkgd", probs_bkgts.astype(v_bskd.dtype), v_bskd)


def _softmax_attention_fwd(q_btkgd, k_bskd, v_bskd, mask_bts):
    probs_bkgts = _attention_probs(q_btkgd, k_bskd, mask_bts)
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", probs_bkgts.astype(v_bskd.dtype), v_bskd)
    return out_btkgd, (q_btkgd, k_bskd, v_bskd, probs_bkgts, out_btkgd)


def _softmax_attention_bwd(residuals, d_out_btkgd):
    # The softmax backward in flash-attention form: dS = P * (dP - rowsum(dO * O)), one pass
    # over the [T, S] scores instead of autodiff's several.
    q_btkgd, k_bskd, v_bskd, probs_bkgts, out_btkgd = residuals
    f32 = jnp.float32
    d_v = jnp.einsum("bkgts,btkgd->bskd", probs_bkgts.astype(v_bskd.dtype), d_out_btkgd.astype(v_bskd.dtype))
    d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out_btkgd, v_bskd, preferred_element_type=f32)
    row_btkg = jnp.sum(d_out_btkgd.astype(f32) * out_btkgd.astype(f32), axis=-1)
    d_logits = probs_bkgts * (d_probs - jnp.transpose(row_btkg, (0, 2, 3, 1))[..., None])
    d_logits = (d_logits * (q_btkgd.shape[-1] ** -0.5)).astype(q_btkgd.dtype)
    d_q = jnp.einsum("bkgts,bskd->btkgd", d_logits, k_bskd)
    d_k = jnp.einsum("bkgts,btkgd->bskd", d_logits, q_btkgd)
    return d_q, d_k.astype(k_bskd.dtype), d_v.astype(v_bskd.dtype), None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


IMPLS = ("auto", "xla", "pallas", "splash", "cudnn")
_logger = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        _logger.log(level, message)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` stands for on `platform` (default: JAX's default backend).

    auto: our Pallas kernels on TPU and GPU, XLA on CPU (the kernels would only run
    interpreted there). pallas / splash / cudnn are honoured where they can run and
    rejected with the reason where they cannot; pallas on CPU runs interpreted (slow, for tests).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r} is unknown; use one of {IMPLS}")
    platform = platform or _target_platform()
    on_accelerator = platform in ("tpu", "gpu", "cuda", "rocm")
    if impl == "auto":
        choice = "pallas" if on_accelerator else "xla"
        why = (f"the Pallas flash/decode kernels are compiled for {platform}" if on_accelerator
               else f"no accelerator ({platform}): XLA is the fast path; the Pallas kernels would run interpreted")
        _log_once(f"auto:{platform}", f"attention_impl=auto -> {choice}: {why}")
        return choice
    if impl == "splash" and platform not in ("tpu", "cpu"):
        raise ValueError(f"attention_impl='splash' is a TPU kernel and cannot run on {platform}; "
                         "use 'pallas', 'cudnn' or 'auto'")
    if impl == "cudnn" and platform not in ("gpu", "cuda"):
        raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU (running on {platform}); "
                         "use 'auto', 'pallas' or 'xla'")
    if impl in ("pallas", "splash") and not on_accelerator:
        _log_once(f"interpret:{impl}", f"attention_impl={impl!r} on {platform}: running the TPU kernels in the "
                  "Pallas interpreter (correct but slow; use 'xla' or 'auto' for speed)", logging.WARNING)
    return impl


def _target_platform() -> str:
    from pallas_kernels.ops import target_platform

    return target_platform()


def _context_mesh():
    """The mesh made current by jax.set_mesh / `with mesh:` (or None)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    try:  # the legacy `with Mesh(...):` context
        from jax._src.mesh import thread_resources

        physical = thread_resources.env.physical_mesh
        return None if physical.empty else physical
    except (ImportError, AttributeError):
        return None


def _mesh_axes(logical: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Mesh axes that a logical activation axis maps to under the current flax rules."""
    import flax.linen as nn

    rules = nn.get_logical_axis_rules()
    if not rules:
        return default
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _splash(q_bthd, k_bskd, v_bskd, *, q_offset=None, q_segment_ids=None, kv_segment_ids=None, causal=True,
            sliding_window=None, interpret=False):
    """JAX's splash attention (TPU) behind our signature: [B,T,H,D] in and out."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    del q_offset  # callers route offsets elsewhere
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
                                interpret=interpret)
    q = (q_bthd * jnp.asarray(d ** -0.5, q_bthd.dtype)).transpose(0, 2, 1, 3)
    k, v = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    if q_segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        segs = sa.SegmentIds(q=q_segment_ids.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
        out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(q, k, v, segs)
    return out.transpose(0, 2, 1, 3).astype(v_bskd.dtype)


def _cudnn(q_bthd, k_bskd, v_bskd, *, causal=True, sliding_window=None, **_):
    window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window)
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, is_causal=causal, local_window_size=window,
                                        implementation="cudnn")


def _kernel_call(impl: str, q_bthd, k_bskd, v_bskd, q_offset_b, q_segment_ids_bt, kv_segment_ids_bs, causal,
                 sliding_window, interpret):
    """The kernel call for a resolved non-XLA impl, or None where that impl cannot take the case."""
    import pallas_kernels as pk

    t, s = q_bthd.shape[1], k_bskd.shape[1]
    decoding = t == 1 and q_offset_b is not None and q_segment_ids_bt is None and causal
    backend = "gpu" if _target_platform() in ("gpu", "cuda", "rocm") else "tpu"
    if impl == "cudnn":
        if q_offset_b is not None or q_segment_ids_bt is not None:
            _log_once("cudnn-fallback", "attention_impl='cudnn': segment ids and cache offsets are not supported "
                      "by cuDNN here; those calls use the Pallas kernels", logging.WARNING)
            impl = "pallas"
        else:
            return "flash", functools.partial(_cudnn, causal=causal, sliding_window=sliding_window)
    if impl == "splash":
        if q_offset_b is None and t == s and t % 128 == 0:
            return "flash", functools.partial(_splash, causal=causal, sliding_window=sliding_window,
                                              interpret=interpret)
        _log_once("splash-fallback", "attention_impl='splash': cache offsets and lengths that are not multiples "
                  "of 128 are not supported by splash; those calls use the Pallas kernels", logging.WARNING)
    if decoding:
        return "decode", functools.partial(pk.decode_attention, sliding_window=sliding_window, backend=backend,
                                           interpret=interpret)
    return "flash", functools.partial(pk.flash_attention, causal=causal, sliding_window=sliding_window,
                                      backend=backend, interpret=interpret)


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *,
              q_offset_b: jax.Array | None = None, q_segment_ids_bt: jax.Array | None = None,
              kv_segment_ids_bs: jax.Array | None = None, causal: bool = True,
              sliding_window: int | None = None, impl: str = "auto", kv_heads_major: bool = False) -> jax.Array:
    """Multi-head attention with GQA, causal / sliding-window / segment masking.

    q [B, T, H, D]; k, v [B, S, KV, D] with KV dividing H (k [B, KV, S, D] and v [B, KV, D, S]
    with `kv_heads_major`, the layout of the XLA path's decode cache). `q_offset_b` [B] is the index of each row's
    first query in the key sequence (0 for self-attention over the same tokens, the cache
    position when decoding). Returns [B, T, H, D] in v's dtype.

    `impl` (see `resolve_impl`): xla is the reference; pallas runs our flash kernel (and,
    for one query per row against a cache, the decode kernel); splash and cudnn run JAX's
    kernels where they support the case. Under a mesh (jax.set_mesh or `with mesh:`) the
    kernels run per device through shard_map over the batch and head axes that the flax
    logical rules give `batch` and `act_heads`.
    """
    kv_heads = k_bskd.shape[1 if kv_heads_major else 2]
    if q_bthd.shape[2] % kv_heads:
        raise ValueError(f"{q_bthd.shape[2]} query heads cannot share {kv_heads} kv heads")
    resolved = resolve_impl(impl)
    if kv_heads_major and resolved == "xla":
        return xla_attention(q_bthd, k_bskd, v_bskd, q_offset_b=q_offset_b, q_segment_ids_bt=q_segment_ids_bt,
                             kv_segment_ids_bs=kv_segment_ids_bs, causal=causal, sliding_window=sliding_window,
                             kv_heads_major=True)
    if kv_heads_major:  # the kernels tile [B, S, KV, D]
        k_bskd, v_bskd = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 3, 1, 2)
    if q_offset_b is None and kv_segment_ids_bs is None and q_bthd.shape[1] == k_bskd.shape[1]:
        # Under a mesh that splits sequences (phi3jax.sharding, mesh.sequence > 1), self-attention
        # runs as ring attention, so no device ever holds a whole sequence's keys.
        from phi3jax import ring_attention as ring

        mesh = ring.sequence_parallel_mesh()
        if mesh is not None:
            if resolved != "xla":
                _log_once(f"ring:{resolved}", f"attention_impl={resolved!r} under mesh.sequence="
                          f"{mesh.shape['sequence']}: ring attention computes its blocks with XLA (the kernels "
                          "shard batch and heads, not the sequence)")
            return ring.ring_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt=q_segment_ids_bt, causal=causal,
                                       sliding_window=sliding_window, mesh=mesh)
    if resolved == "xla":
        return xla_attention(q_bthd, k_bskd, v_bskd, q_offset_b=q_offset_b,
                             q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs,
                             causal=causal, sliding_window=sliding_window)
    mesh = _context_mesh()
    # On CPU the kernels run interpreted: the TPU interpreter on one device, Pallas' generic
    # interpreter under a mesh (the TPU interpreter cannot run inside a multi-device shard_map).
    interpret = _target_platform() == "cpu" and (True if mesh is None else "hlo")
    kind, fn = _kernel_call(resolved, q_bthd, k_bskd, v_bskd, q_offset_b, q_segment_ids_bt, kv_segment_ids_bs,
                            causal, sliding_window, interpret)
    if kind == "decode":
        lengths_b = q_offset_b + 1
        if mesh is None:
            return fn(q_bthd[:, 0], k_bskd, v_bskd, lengths_b)[:, None]
        import pallas_kernels as pk

        return pk.sharded_decode_attention(
            q_bthd[:, 0], k_bskd, v_bskd, lengths_b, mesh=mesh, batch_axes=_mesh_axes("batch", ("data", "fsdp")),
            head_axes=_mesh_axes("act_heads", ("tensor",)), sliding_window=sliding_window,
            backend=fn.keywords["backend"], interpret=interpret)[:, None]
    if mesh is None:
        return fn(q_bthd, k_bskd, v_bskd, q_offset=q_offset_b, q_segment_ids=q_segment_ids_bt,
                  kv_segment_ids=kv_segment_ids_bs)
    import pallas_kernels as pk

    return pk.sharded_flash_attention(
        q_bthd, k_bskd, v_bskd, mesh=mesh, batch_axes=_mesh_axes("batch", ("data", "fsdp")),
        head_axes=_mesh_axes("act_heads", ("tensor",)), q_offset=q_offset_b, q_segment_ids=q_segment_ids_bt,
        kv_segment_ids=kv_segment_ids_bs, attention_fn=fn)
