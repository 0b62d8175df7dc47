"""The `ring` attention backend: exact self-attention over sequences split across the `sequence` mesh axis.

Each of the n devices on the axis holds one contiguous block of T/n queries and the matching
block of keys/values. The key/value blocks travel around the ring (`ppermute`); at step s a
device attends its queries to the block that started on device (i - s) mod n and folds it in
with an online softmax (`phi3jax.ops.blockwise`). The rotation for step s+1 is issued before
step s computes and does not depend on it, so XLA overlaps the transfer with the block's
matmuls. After n steps every query has seen every key exactly once: the result equals unsharded
attention up to float summation order.

Memory stays O(T/n) per device in the backward pass too: a custom VJP keeps only q, k, v, the
output and the log-sum-exp, and runs a second ring in which the key/value gradients travel
with their blocks and arrive home after n hops (FlashAttention-2's backward, blockwise).

Masks are the reference's, on global token indices; a block that is masked out entirely is
skipped (`lax.cond`). Blocks are contiguous, so under causal masking the last device does the
most work; a striped/zig-zag layout would balance it at the cost of permuting tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.reference import mask_from_indices
from phi3jax.ops import blockwise
from phi3jax.parallel.axes import ACT_HEADS, ACT_KV_HEADS, BATCH, HEAD_DIM, LENGTH, Rules, spec

SEQUENCE_AXIS = "sequence"


def ring_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *, mesh: Any, rules: Rules,
                   segment_ids_bt: jax.Array | None = None, causal: bool = True,
                   sliding_window: int | None = None) -> jax.Array:
    """Self-attention (q, k, v over the same T tokens) with T split over the mesh's `sequence` axis.

    Global arrays in, global array out: q [B, T, H, D], k/v [B, T, KV, D], segment ids [B, T].
    Batch and heads stay sharded as `rules` say; only the sequence axis communicates.
    """
    n = dict(mesh.shape).get(SEQUENCE_AXIS, 1)
    b, t, h, _ = q_bthd.shape
    if k_bskd.shape[1] != t:
        raise ValueError(f"ring attention is self-attention: {t} queries but {k_bskd.shape[1]} keys")
    if t % n:
        raise ValueError(f"sequence length {t} is not divisible by mesh.{SEQUENCE_AXIS}={n}")
    q_spec, kv_spec = spec((BATCH, LENGTH, ACT_HEADS, HEAD_DIM), rules), spec((BATCH, LENGTH, ACT_KV_HEADS, HEAD_DIM),
                                                                                  rules)
    if q_spec[1] != SEQUENCE_AXIS:
        raise ValueError(f"ring attention needs the logical axis {LENGTH!r} mapped to the mesh axis "
                         f"{SEQUENCE_AXIS!r}; the rules map it to {q_spec[1]!r}")
    if q_spec[2] != kv_spec[2]:
        # Query heads are split over an axis the kv heads are not (fewer kv heads than tensor
        # shards): give every query head its own copy of its kv head so the groups stay local.
        group = h // k_bskd.shape[2]
        k_bskd, v_bskd = jnp.repeat(k_bskd, group, axis=2), jnp.repeat(v_bskd, group, axis=2)
        kv_spec = q_spec
    if segment_ids_bt is None:
        segment_ids_bt = jnp.zeros((b, t), jnp.int32)
    local = functools.partial(_ring_local, n=n, causal=causal, window=sliding_window)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], q_spec[1])),
                         out_specs=q_spec, check_vma=False)(q_bthd, k_bskd, v_bskd, segment_ids_bt.astype(jnp.int32))


def _ring_local(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, seg_bt: jax.Array, *,
                n: int, causal: bool, window: int | None) -> jax.Array:
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    # The masks depend only on segment ids and device indices. Left as they are, they count as
    # loop-invariant under the layer scan, whose partial evaluation then computes every ring
    # step's mask for all steps at once, outside the loop: O(T^2 / n) per device (a 128k-token
    # Phi-3-mini step on 64 chips needed 43 GiB of temporaries per chip instead of 2.6). Tying
    # them to q keeps them in the loop, one block at a time.
    idx = jax.lax.axis_index(SEQUENCE_AXIS)
    q_bthd, seg_bt, idx = jax.lax.optimization_barrier((q_bthd, seg_bt, idx))
    scale = jnp.asarray(d ** -0.5, q_bthd.dtype)
    q_bkgtd = (q_bthd * scale).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    k_bksd, v_bksd = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
    out_bkgtd = _ring(q_bkgtd, k_bksd, v_bksd, seg_bt, idx, n, causal, window)
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _block_mask(q_seg_bt, kv_seg_bs, idx, step, n, causal, window):
    """[B, 1, 1, T, T]: this device's queries against the block that started on device idx - step."""
    t = q_seg_bt.shape[1]
    q_idx = (idx * t + jnp.arange(t))[None]
    k_idx = ((idx - step) % n) * t + jnp.arange(t)
    mask = mask_from_indices(q_idx, k_idx, q_segment_ids=q_seg_bt, kv_segment_ids=kv_seg_bs, causal=causal,
                             sliding_window=window)
    return mask[:, None, None]


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % n) for j in range(n)]


def _forward(q, k, v, seg, idx, n, causal, window):
    """(output [B, KV, G, T, D] in v's dtype, log-sum-exp [B, KV, G, T] float32)."""
    perm = _ring_perm(n)

    def attend(state, step, k, v, kv_seg):
        mask = _block_mask(seg, kv_seg, idx, step, n, causal, window)
        return jax.lax.cond(jnp.any(mask), lambda: blockwise.update(state, q, k, v, mask), lambda: state)

    def body(carry, step):
        state, k, v, kv_seg = carry
        # Start moving the next block before computing on this one: the two are independent.
        nxt = tuple(jax.lax.ppermute(x, SEQUENCE_AXIS, perm) for x in (k, v, kv_seg))
        return (attend(state, step, k, v, kv_seg), *nxt), None

    (state, k, v, kv_seg), _ = jax.lax.scan(body, (blockwise.start(q), k, v, seg), jnp.arange(n - 1))
    state = attend(state, n - 1, k, v, kv_seg)  # the last block needs no onward rotation
    return blockwise.finish(state, v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, seg, idx, n, causal, window):
    return _forward(q, k, v, seg, idx, n, causal, window)[0]


def _ring_fwd(q, k, v, seg, idx, n, causal, window):
    out, lse = _forward(q, k, v, seg, idx, n, causal, window)
    return out, (q, k, v, seg, idx, out, lse)


def _ring_bwd(n, causal, window, res, d_out):
    q, k, v, seg, idx, out, lse = res
    perm = _ring_perm(n)
    delta = blockwise.out_dot(out, d_out)

    def body(carry, step):
        dq, k, v, kv_seg, dk, dv = carry
        nxt = tuple(jax.lax.ppermute(x, SEQUENCE_AXIS, perm) for x in (k, v, kv_seg))
        mask = _block_mask(seg, kv_seg, idx, step, n, causal, window)
        zeros = (jnp.zeros_like(dq), jnp.zeros_like(dk), jnp.zeros_like(dv))
        dq_b, dk_b, dv_b = jax.lax.cond(jnp.any(mask), lambda: blockwise.grads(q, k, v, d_out, lse, delta, mask),
                                        lambda: zeros)
        # The key/value gradients travel with their block; after n hops they are home.
        dk, dv = (jax.lax.ppermute(x, SEQUENCE_AXIS, perm) for x in (dk + dk_b, dv + dv_b))
        return (dq + dq_b, *nxt, dk, dv), None

    f32 = jnp.float32
    init = (jnp.zeros(q.shape, f32), k, v, seg, jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    (dq, _, _, _, dk, dv), _ = jax.lax.scan(body, init, jnp.arange(n))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
