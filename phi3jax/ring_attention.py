"""Ring attention: exact attention over sequences split across the `sequence` mesh axis.

Each of the n devices on the axis holds one contiguous block of T/n queries and the matching
block of keys/values. The key/value blocks travel around the ring (`ppermute`); at step s a
device attends its queries to the block that started on device (i - s) mod n and folds it in
with an online softmax (running max m, running sum l, unnormalised output o, all float32).
The rotation for step s+1 is issued before step s computes and does not depend on it, so XLA
overlaps the transfer with the block's matmuls. After n steps every query has seen every key
exactly once: the result equals unsharded attention up to float summation order.

Memory stays O(T/n) per device in the backward pass too: a custom VJP keeps only q, k, v, the
output and the log-sum-exp, and runs a second ring in which the key/value gradients travel
with their blocks and arrive home after n hops (FlashAttention-2's backward, blockwise).

Masks are the reference's (`phi3jax.attention`): causal and sliding window on global token
indices, plus segment ids; a block that is masked out entirely is skipped (`lax.cond`).
Blocks are contiguous, so under causal masking the last device does the most work; a
striped/zig-zag layout would balance it at the cost of permuting tokens.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from phi3jax.attention import _MASK_VALUE
from phi3jax.model import ACT_HEADS, ACT_KV_HEADS, BATCH, LENGTH

SEQUENCE_AXIS = "sequence"


def sequence_parallel_mesh(axis_name: str = SEQUENCE_AXIS) -> jax.sharding.AbstractMesh | None:
    """The current mesh if it splits sequences (its `axis_name` axis is larger than 1), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(axis_name, 1) == 1:
        return None
    return mesh


def _specs(axis_name: str) -> tuple[P, P]:
    from phi3jax.sharding import LOGICAL_RULES

    rules = nn.get_logical_axis_rules() or LOGICAL_RULES
    q_spec = nn.logical_to_mesh_axes((BATCH, LENGTH, ACT_HEADS, "head_dim"), rules)
    kv_spec = nn.logical_to_mesh_axes((BATCH, LENGTH, ACT_KV_HEADS, "head_dim"), rules)
    if q_spec[1] != axis_name:
        raise ValueError(f"ring attention needs the logical axis {LENGTH!r} mapped to the mesh axis "
                         f"{axis_name!r}; the rules map it to {q_spec[1]!r}")
    return q_spec, kv_spec


def ring_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *,
                   segment_ids_bt: jax.Array | None = None, causal: bool = True,
                   sliding_window: int | None = None, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                   axis_name: str = SEQUENCE_AXIS) -> jax.Array:
    """Self-attention (q, k, v over the same T tokens) with T split over `axis_name`.

    Global arrays in, global array out, like `phi3jax.attention.attention`: q [B, T, H, D],
    k/v [B, T, KV, D], segment ids [B, T]. Batch and heads stay sharded as the logical rules
    say; only the sequence axis communicates.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.shape:
        raise ValueError(f"ring attention needs a mesh with a {axis_name!r} axis (use phi3jax.sharding.mesh_context)")
    n = mesh.shape[axis_name]
    b, t, h, _ = q_bthd.shape
    if k_bskd.shape[1] != t:
        raise ValueError(f"ring attention is self-attention: {t} queries but {k_bskd.shape[1]} keys")
    if t % n:
        raise ValueError(f"sequence length {t} is not divisible by mesh.{axis_name}={n}")
    q_spec, kv_spec = _specs(axis_name)
    if q_spec[2] != kv_spec[2]:
        # Query heads are split over an axis the kv heads are not (fewer kv heads than tensor
        # shards): give every query head its own copy of its kv head so the groups stay local.
        group = h // k_bskd.shape[2]
        k_bskd, v_bskd = jnp.repeat(k_bskd, group, axis=2), jnp.repeat(v_bskd, group, axis=2)
        kv_spec = q_spec
    if segment_ids_bt is None:
        segment_ids_bt = jnp.zeros((b, t), jnp.int32)
    seg_spec = P(q_spec[0], q_spec[1])
    local = functools.partial(_ring_local, axis_name=axis_name, n=n, causal=causal, window=sliding_window)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_bthd, k_bskd, v_bskd, segment_ids_bt.astype(jnp.int32))


def _ring_local(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, seg_bt: jax.Array, *,
                axis_name: str, n: int, causal: bool, window: int | None) -> jax.Array:
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    # The masks depend only on segment ids and device indices. Left as they are, they count as
    # loop-invariant under the layer scan, whose partial evaluation (flax's nn.scan) then computes
    # every ring step's mask and masked-logit fill for all steps at once, outside the loop:
    # O(T^2 / n) per device (a 128k-token Phi-3-mini step on 64 chips needed 43 GiB of temporaries
    # per chip instead of 2.6). Tying them to q keeps them in the loop, one block at a time.
    idx = jax.lax.axis_index(axis_name)
    q_bthd, seg_bt, idx = jax.lax.optimization_barrier((q_bthd, seg_bt, idx))
    q_btkgd = q_bthd.reshape(b, t, kv, h // kv, d)
    out_btkgd = _ring(q_btkgd, k_bskd, v_bskd, seg_bt, idx, axis_name, n, causal, window)
    return out_btkgd.reshape(b, t, h, d)


# ---------------------------------------------------------------------------- the blocks
def _block_mask(q_seg_bt: jax.Array, kv_seg_bs: jax.Array, q_start: jax.Array, k_start: jax.Array,
                causal: bool, window: int | None) -> jax.Array:
    """[B, Tq, Tk]: the reference mask for queries starting at global index q_start and keys at k_start."""
    q_idx = q_start + jnp.arange(q_seg_bt.shape[1])[:, None]
    k_idx = k_start + jnp.arange(kv_seg_bs.shape[1])[None, :]
    mask = q_seg_bt[:, :, None] == kv_seg_bs[:, None, :]
    if causal:
        mask = mask & (k_idx <= q_idx)[None]
    if window is not None:
        mask = mask & (k_idx > q_idx - window)[None]
    return mask


def _logits(q_btkgd: jax.Array, k_bskd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    scale = q_btkgd.shape[-1] ** -0.5
    s = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32) * scale
    # minimum(s, MASK) is MASK for every finite logit; unlike a broadcast constant it is computed
    # from s, so it is never hoisted out of the loops as a full-size array (see _ring_local).
    return jnp.where(mask_bts[:, None, None], s, jnp.minimum(s, _MASK_VALUE))


def _ring_perm(n: int) -> list[tuple[int, int]]:
    return [(j, (j + 1) % n) for j in range(n)]


def _forward(q_btkgd, k_bskd, v_bskd, seg_bt, idx, axis_name, n, causal, window):
    """(output [B, T, KV, G, D] in v's dtype, log-sum-exp [B, KV, G, T] float32)."""
    b, t, kv, g, d = q_btkgd.shape
    perm = _ring_perm(n)

    def attend(carry, step, k, v, kv_seg):
        o, m, l = carry
        mask = _block_mask(seg_bt, kv_seg, idx * t, ((idx - step) % n) * t, causal, window)

        def update():
            s = _logits(q_btkgd, k, mask)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            return o * corr[..., None] + pv, m_new, l * corr + jnp.sum(p, axis=-1)

        return jax.lax.cond(jnp.any(mask), update, lambda: (o, m, l))

    def body(carry, step):
        stats, k, v, kv_seg = carry
        # Start moving the next block before computing on this one: the two are independent.
        nxt = tuple(jax.lax.ppermute(x, axis_name, perm) for x in (k, v, kv_seg))
        return (attend(stats, step, k, v, kv_seg), *nxt), None

    stats = (jnp.zeros((b, kv, g, t, d), jnp.float32), jnp.full((b, kv, g, t), -jnp.inf, jnp.float32),
             jnp.zeros((b, kv, g, t), jnp.float32))
    (stats, k, v, kv_seg), _ = jax.lax.scan(body, (stats, k_bskd, v_bskd, seg_bt), jnp.arange(n - 1))
    o, m, l = attend(stats, n - 1, k, v, kv_seg)  # the last block needs no onward rotation
    out = (o / l[..., None]).transpose(0, 3, 1, 2, 4).astype(v_bskd.dtype)
    return out, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q_btkgd, k_bskd, v_bskd, seg_bt, idx, axis_name, n, causal, window):
    return _forward(q_btkgd, k_bskd, v_bskd, seg_bt, idx, axis_name, n, causal, window)[0]


def _ring_fwd(q_btkgd, k_bskd, v_bskd, seg_bt, idx, axis_name, n, causal, window):
    out, lse = _forward(q_btkgd, k_bskd, v_bskd, seg_bt, idx, axis_name, n, causal, window)
    return out, (q_btkgd, k_bskd, v_bskd, seg_bt, idx, out, lse)


def _ring_bwd(axis_name, n, causal, window, res, d_out_btkgd):
    q_btkgd, k_bskd, v_bskd, seg_bt, idx, out_btkgd, lse = res
    t = q_btkgd.shape[1]
    scale = q_btkgd.shape[-1] ** -0.5
    perm = _ring_perm(n)
    f32 = jnp.float32
    q = q_btkgd.astype(f32)
    do_bkgtd = d_out_btkgd.astype(f32).transpose(0, 2, 3, 1, 4)
    # D = rowsum(dO * O): the softmax-Jacobian term, one number per query.
    delta = jnp.sum(do_bkgtd * out_btkgd.astype(f32).transpose(0, 2, 3, 1, 4), axis=-1)

    def body(carry, step):
        dq, k, v, kv_seg, dk, dv = carry
        nxt = tuple(jax.lax.ppermute(x, axis_name, perm) for x in (k, v, kv_seg))
        mask = _block_mask(seg_bt, kv_seg, idx * t, ((idx - step) % n) * t, causal, window)

        def grads():
            p = jnp.exp(_logits(q_btkgd, k, mask) - lse[..., None])
            dv_b = jnp.einsum("bkgts,bkgtd->bskd", p, do_bkgtd)
            dp = jnp.einsum("bkgtd,bskd->bkgts", do_bkgtd, v.astype(f32))
            ds = p * (dp - delta[..., None]) * scale
            return (jnp.einsum("bkgts,bskd->btkgd", ds, k.astype(f32)),
                    jnp.einsum("bkgts,btkgd->bskd", ds, q), dv_b)

        zeros = (jnp.zeros_like(dq), jnp.zeros_like(dk), jnp.zeros_like(dv))
        dq_b, dk_b, dv_b = jax.lax.cond(jnp.any(mask), grads, lambda: zeros)
        # The key/value gradients travel with their block; after n hops they are home.
        dk, dv = (jax.lax.ppermute(x, axis_name, perm) for x in (dk + dk_b, dv + dv_b))
        return (dq + dq_b, *nxt, dk, dv), None

    init = (jnp.zeros(q.shape, f32), k_bskd, v_bskd, seg_bt, jnp.zeros(k_bskd.shape, f32),
            jnp.zeros(v_bskd.shape, f32))
    (dq, _, _, _, dk, dv), _ = jax.lax.scan(body, init, jnp.arange(n))
    return dq.astype(q_btkgd.dtype), dk.astype(k_bskd.dtype), dv.astype(v_bskd.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
