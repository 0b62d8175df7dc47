"""The `cpu` attention backend: causal self-attention scheduled for CPU caches and cores.

XLA on CPU runs each op of a batched attention over all (batch, head) pairs at once, so every
softmax pass streams [B, H, T, S] scores through memory, one thread per op. This schedule takes
one (batch, kv head) pair at a time in the forward (`lax.map`), so a pair's score tiles stay in
cache, and runs one independent map per CPU core so the cores work side by side. Causal tiles
only visit the keys they can see. The backward is flash-attention style (probabilities
recomputed from the saved log-sum-exp) and runs over all pairs at once in larger query tiles: its
five matmuls per tile are big enough to thread well. Long sequences take the pairs in groups, so
one tile's float32 scores stay under `_BACKWARD_TILE_BYTES`.

Same math and mask as the reference (`phi3jax.ops.blockwise`, `pallas_kernels.reference`); the
dispatcher (`phi3jax.ops.attention`) picks this backend for self-attention on one CPU device.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels.reference import mask_from_indices
from phi3jax.ops import blockwise

_TILE_Q, _BACKWARD_TILE_Q, _MAX_TILES = 128, 256, 16
_BACKWARD_TILE_BYTES = 32 * 2**20


def _query_tiles(t: int, sliding_window: int | None, tile: int = _TILE_Q) -> list[tuple[int, int, int]]:
    """(first query, end, first visible key) of each query tile of causal self-attention."""
    block = max(tile, -(-t // _MAX_TILES))
    return [(start, min(start + block, t), 0 if sliding_window is None else max(0, start - sliding_window + 1))
            for start in range(0, t, block)]


def _tile_mask(seg_t: jax.Array | None, start: int, end: int, lo: int, sliding_window: int | None) -> jax.Array:
    """[P or 1, 1, end - start, end - lo]: the reference mask of one query tile (pairs on axis 0)."""
    segments = {} if seg_t is None else dict(q_segment_ids=seg_t[..., start:end].reshape(-1, end - start),
                                             kv_segment_ids=seg_t[..., lo:end].reshape(-1, end - lo))
    mask = mask_from_indices(jnp.arange(start, end)[None], jnp.arange(lo, end), causal=True,
                             sliding_window=sliding_window, **segments)
    return mask[:, None]


def _pair_forward(q_gtd, k_sd, v_sd, seg_t, sliding_window):
    outs, lses = [], []
    for start, end, lo in _query_tiles(q_gtd.shape[1], sliding_window):
        mask = _tile_mask(seg_t, start, end, lo, sliding_window)[0]
        q = q_gtd[:, start:end]
        state = blockwise.update(blockwise.start(q), q, k_sd[lo:end], v_sd[lo:end], mask)
        out, lse = blockwise.finish(state, v_sd.dtype)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _tiles_backward(q_pgtd, k_psd, v_psd, seg_pt, out_pgtd, lse_pgt, d_out_pgtd, sliding_window):
    """dq, dk, dv (float32) of every pair at once ([P, ...] leading), one query tile at a time."""
    delta = blockwise.out_dot(out_pgtd, d_out_pgtd)
    d_k, d_v = jnp.zeros(k_psd.shape, jnp.float32), jnp.zeros(v_psd.shape, jnp.float32)
    d_qs = []
    for start, end, lo in _query_tiles(q_pgtd.shape[2], sliding_window, _BACKWARD_TILE_Q):
        mask = _tile_mask(seg_pt, start, end, lo, sliding_window)
        dq, dk, dv = blockwise.grads(q_pgtd[:, :, start:end], k_psd[:, lo:end], v_psd[:, lo:end],
                                     d_out_pgtd[:, :, start:end], lse_pgt[..., start:end], delta[..., start:end], mask)
        d_qs.append(dq)
        d_k, d_v = d_k.at[:, lo:end].add(dk), d_v.at[:, lo:end].add(dv)
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
    """[B, T, H, D] -> per (batch, kv head): q [P, G, T, D] (scaled), k and v [P, S, D], segment ids [P, T]."""
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
def cpu_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, segment_ids_bt: jax.Array | None,
                  sliding_window: int | None) -> jax.Array:
    """Causal self-attention (q [B, T, H, D], k and v [B, T, KV, D]) with the reference's result."""
    return _forward(q_bthd, k_bskd, v_bskd, segment_ids_bt, sliding_window)[0]


def _forward(q_bthd, k_bskd, v_bskd, segment_ids_bt, sliding_window):
    q, k, v, seg = _to_pairs(q_bthd, k_bskd, v_bskd, segment_ids_bt)
    out, lse = _map_pairs(lambda *a: _pair_forward(*a, sliding_window), (q, k, v, seg), q.shape[0])
    return _from_pairs(out, q_bthd.shape), (q_bthd, k_bskd, v_bskd, segment_ids_bt, out, lse)


def _backward(sliding_window, residuals, d_out_bthd):
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


cpu_attention.defvjp(_forward, _backward)
