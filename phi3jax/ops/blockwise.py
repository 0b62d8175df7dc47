"""Attention one (query block, key block) pair at a time, in plain JAX: the flash-attention math.

Written once and used by the blockwise backends (the CPU schedule and ring attention); the Pallas
kernels carry the same math inside their kernels. Shapes share any leading axes `...` (batch and
kv heads, or (batch, kv head) pairs):

    q [..., G, T, D]   the G query heads of one kv head, T queries, pre-multiplied by the softmax
                       scale (so the gradient returned for q is the scaled q's: multiply it by the scale)
    k, v [..., S, D]   that kv head's keys and values
    mask [..., 1, T, S] or broadcastable (True: attend)

Forward: an online softmax. Each block updates a running (output, row max, row sum) in float32;
`finish` normalises and returns the log-sum-exp the backward needs. Backward: the probabilities
are recomputed from the log-sum-exp, dS = P * (dP - rowsum(dO * O)), with no [T, S] state kept.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.reference import MASK_VALUE


class Running(NamedTuple):
    """The online softmax's state over the keys seen so far (float32)."""

    out: jax.Array  # [..., G, T, D] unnormalised output
    row_max: jax.Array  # [..., G, T]
    row_sum: jax.Array  # [..., G, T]


def start(q_gtd: jax.Array) -> Running:
    shape = q_gtd.shape[:-1]
    return Running(jnp.zeros(q_gtd.shape, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32),
                   jnp.zeros(shape, jnp.float32))


def logits(q_gtd: jax.Array, k_sd: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked float32 logits [..., G, T, S]."""
    s = jnp.einsum("...gtd,...sd->...gts", q_gtd, k_sd, preferred_element_type=jnp.float32)
    # minimum(s, MASK) is MASK for every finite logit; unlike a broadcast constant it is computed
    # from s, so a loop's partial evaluation (flax's nn.scan, lax.scan) never hoists it out of the
    # loop as one full-size array per iteration.
    return jnp.where(mask, s, jnp.minimum(s, MASK_VALUE))


def update(state: Running, q_gtd: jax.Array, k_sd: jax.Array, v_sd: jax.Array, mask: jax.Array) -> Running:
    """Fold one key block into the running softmax."""
    s = logits(q_gtd, k_sd, mask)
    row_max = jnp.maximum(state.row_max, jnp.max(s, axis=-1))
    p = jnp.exp(s - row_max[..., None])
    correction = jnp.exp(state.row_max - row_max)
    pv = jnp.einsum("...gts,...sd->...gtd", p.astype(v_sd.dtype), v_sd, preferred_element_type=jnp.float32)
    return Running(state.out * correction[..., None] + pv, row_max, state.row_sum * correction + jnp.sum(p, axis=-1))


def finish(state: Running, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """(output [..., G, T, D] in `dtype`, log-sum-exp [..., G, T] float32)."""
    return (state.out / state.row_sum[..., None]).astype(dtype), state.row_max + jnp.log(state.row_sum)


def out_dot(out_gtd: jax.Array, d_out_gtd: jax.Array) -> jax.Array:
    """rowsum(dO * O) [..., G, T] (float32): the softmax Jacobian's term, once per query."""
    return jnp.sum(d_out_gtd.astype(jnp.float32) * out_gtd.astype(jnp.float32), axis=-1)


def grads(q_gtd: jax.Array, k_sd: jax.Array, v_sd: jax.Array, d_out_gtd: jax.Array, lse_gt: jax.Array,
          delta_gt: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One block pair's contributions (float32) to dq [..., G, T, D], dk and dv [..., S, D]."""
    f32 = jnp.float32
    p = jnp.exp(logits(q_gtd, k_sd, mask) - lse_gt[..., None])
    d_v = jnp.einsum("...gts,...gtd->...sd", p.astype(v_sd.dtype), d_out_gtd.astype(v_sd.dtype),
                     preferred_element_type=f32)
    d_p = jnp.einsum("...gtd,...sd->...gts", d_out_gtd, v_sd, preferred_element_type=f32)
    d_s = (p * (d_p - delta_gt[..., None])).astype(q_gtd.dtype)
    d_q = jnp.einsum("...gts,...sd->...gtd", d_s, k_sd, preferred_element_type=f32)
    d_k = jnp.einsum("...gts,...gtd->...sd", d_s, q_gtd, preferred_element_type=f32)
    return d_q, d_k, d_v
