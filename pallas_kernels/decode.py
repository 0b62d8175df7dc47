"""Decode attention: one new query per row against a KV cache, rows of different lengths.

q [B, H, D]; k_cache, v_cache [B, KV, S, D] (the model's heads-major cache, read in place);
lengths [B]: row b attends to cache positions [max(0, len_b - W), len_b). GQA-aware: the G
query heads of a kv head are computed together against one read of that head's keys.

TPU: grid (row, key block); the row's length is scalar-prefetched so the index map clamps
at the row's last live block (no DMA, no compute past a row's length or before its window).
A block holds all kv heads ([KV, bk, D]: each head's keys contiguous), so decoding reads exactly
the live prefix of the cache once.

GPU: flash-decoding. Grid (row, kv head, split); each program reduces one chunk of the live
keys to a partial output and log-sum-exp, combined in a final XLA step. Splits keep the GPU
busy when batch * kv_heads is small.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import cdiv, pad_axis, round_up
from pallas_kernels.flash_tpu import interpret_arg

LANES = 128
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


def _live_blocks(length, block: int, window: int | None):
    """First and last key block holding a live key for a row of `length` keys."""
    first = 0 if window is None else jnp.maximum(length - window, 0) // block
    return first, (length - 1) // block


# ------------------------------------------------------------------------------ TPU
def _tpu_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, block: int, window, scale: float,
                kv_heads: int):
    b, j = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    first, last = _live_blocks(length, block, window)
    blk = first + j

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(blk <= last)
    def _step():
        group = q_ref.shape[1]
        k_pos = blk * block + jax.lax.broadcasted_iota(jnp.int32, (group, block), 1)
        mask = k_pos < length
        if window is not None:
            mask = mask & (k_pos >= length - window)
        for h in range(kv_heads):
            k, v = k_ref[h], v_ref[h]
            s = jax.lax.dot_general(q_ref[h], k, NT, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, -jnp.inf)
            m_prev = m_sc[h]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[h] = m_next
            pv = jax.lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
            acc_sc[h] = acc_sc[h] * alpha[:, :1] + pv

    @pl.when(j == pl.num_programs(1) - 1)
    def _finalize():
        l = l_sc[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] * (1.0 / l_safe)[:, :, :1]).astype(o_ref.dtype)


def default_tpu_block(kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Keys per block: about 1 MiB of K per block (x2 for V, x2 for double buffering)."""
    rows = (1 << 20) // (kv_heads * head_dim * itemsize)
    return int(max(16, min(512, 1 << (rows.bit_length() - 1))))


def decode_tpu(q, k_cache, v_cache, lengths, *, window, scale, block_k=None, interpret=False):
    batch, heads, d = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv
    block = block_k or default_tpu_block(kv, d, k_cache.dtype.itemsize)
    block = min(block, round_up(s, 16))
    if s % block:  # the cache length is a bucket size in practice; pad only if it is not
        k_cache, v_cache = pad_axis(k_cache, 2, round_up(s, block)), pad_axis(v_cache, 2, round_up(s, block))
    num_blocks = k_cache.shape[2] // block
    grid_k = num_blocks if window is None else min(num_blocks, cdiv(window, block) + 1)

    def kv_index(b, j, lengths_ref):
        first, last = _live_blocks(lengths_ref[b], block, window)
        return (b, 0, jnp.maximum(jnp.minimum(first + j, last), 0), 0)

    q_spec = pl.BlockSpec((None, kv, group, d), lambda b, j, _: (b, 0, 0, 0))
    kv_spec = pl.BlockSpec((None, kv, block, d), kv_index)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(batch, grid_k), in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((kv, group, LANES), jnp.float32), pltpu.VMEM((kv, group, LANES), jnp.float32),
                        pltpu.VMEM((kv, group, d), jnp.float32)])
    itemsize = k_cache.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * batch * heads * s * d, transcendentals=batch * heads * s,
                           bytes_accessed=2 * batch * s * kv * d * itemsize + 2 * q.size * q.dtype.itemsize)
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, block=block, window=window, scale=scale, kv_heads=kv),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((batch, kv, group, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost, interpret=interpret_arg(interpret),
        name="phi3_decode_attention",
    )(lengths, q.reshape(batch, kv, group, d), k_cache, v_cache)
    return out.reshape(batch, heads, d)


# ------------------------------------------------------------------------------ GPU
def _gpu_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block: int, chunk_blocks: int, window,
                scale: float, group: int, head_dim: int):
    split = pl.program_id(2)
    gp, dp = q_ref.shape
    dmask = (jnp.arange(dp) < head_dim)[None, :]
    gmask = jnp.arange(gp) < group
    length = lengths_ref[...]
    q = plgpu.load(q_ref, mask=gmask[:, None] & dmask, other=0.0)
    first, last = _live_blocks(length, block, window)
    lo = jnp.maximum(first, split * chunk_blocks)
    hi = jnp.minimum(last, (split + 1) * chunk_blocks - 1)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        acc, m_prev, l_prev = carry
        rows = pl.ds(pl.multiple_of(j * block, block), block)
        k = plgpu.load(k_ref.at[rows, :], mask=dmask, other=0.0)
        v = plgpu.load(v_ref.at[rows, :], mask=dmask, other=0.0)
        s = jax.lax.dot_general(q, k, NT, precision=precision, preferred_element_type=jnp.float32) * scale
        k_pos = j * block + jnp.arange(block)[None, :]
        mask = k_pos < length
        if window is not None:
            mask = mask & (k_pos >= length - window)
        s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        pv = jax.lax.dot_general(p.astype(v.dtype), v, NN, precision=precision, preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_next, alpha * l_prev + jnp.sum(p, axis=1)

    init = (jnp.zeros((gp, dp), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo, hi + 1, body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype), mask=gmask[:, None] & dmask)
    plgpu.store(lse_ref, jnp.where(empty, -jnp.inf, m + jnp.log(l_safe)), mask=gmask)


def decode_gpu(q, k_cache, v_cache, lengths, *, window, scale, block_k=None, num_splits=None, interpret=False):
    batch, heads, d = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv
    block = max(16, min(block_k or 64, pl.next_power_of_2(s)))
    if s % block:
        k_cache, v_cache = pad_axis(k_cache, 2, round_up(s, block)), pad_axis(v_cache, 2, round_up(s, block))
    num_blocks = k_cache.shape[2] // block
    if num_splits is None:  # enough programs to fill ~132 SMs twice
        num_splits = max(1, min(num_blocks, cdiv(264, batch * kv), 16))
    chunk_blocks = cdiv(num_blocks, num_splits)
    gp, dp = max(16, pl.next_power_of_2(group)), max(16, pl.next_power_of_2(d))
    out, lse = pl.pallas_call(
        functools.partial(_gpu_kernel, block=block, chunk_blocks=chunk_blocks, window=window, scale=scale,
                          group=group, head_dim=d),
        grid=(batch, kv, num_splits),
        in_specs=[pl.BlockSpec((None,), lambda b, h, c: (b,)),
                  pl.BlockSpec((None, None, gp, dp), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, k_cache.shape[2], dp), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, k_cache.shape[2], dp), lambda b, h, c: (b, h, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, None, gp, dp), lambda b, h, c: (b, h, c, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda b, h, c: (b, h, c, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, kv, num_splits, group, d), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv, num_splits, group), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
        name="phi3_decode_attention_gpu",
    )(lengths, q.reshape(batch, kv, group, d), k_cache, v_cache)
    # Combine the splits: softmax-weighted by their log-sum-exp (empty splits weigh 0).
    top = jnp.max(lse, axis=2, keepdims=True)
    w = jnp.exp(lse - jnp.where(top == -jnp.inf, 0.0, top))
    total = jnp.sum(w, axis=2, keepdims=True)
    out = jnp.sum(out * (w / jnp.where(total == 0.0, 1.0, total))[..., None], axis=2)
    return out.reshape(batch, heads, d).astype(q.dtype)
