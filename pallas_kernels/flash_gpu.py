"""Flash attention for NVIDIA GPUs (Pallas with the Triton lowering): forward and backward.

Layout: the model's own, q/o [B, T, H, D] and k/v [B, S, KV, D]; no transposes. One program
per (query block, batch row, query head) for the forward and dq kernels, per (key block,
batch row, kv head) for dk/dv. A program loops over just the key (or query) blocks its
mask leaves alive (bounds from `MaskInfo`), and per block branches between a masked and an
unmasked body; with segment ids a block whose ids cannot meet is skipped outright.

GQA: K/V index maps take kv head h // G, so K and V are never repeated; the dk/dv program
of a kv head loops over its G query heads and writes dk, dv once.

head_dim is padded to a power of two inside the kernel only (block shape Dp >= D with
masked loads and stores); the caller's arrays keep D. Sequences are padded to whole blocks
by the wrapper, and padding keys are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import MaskInfo, flash_geometry, flash_with_vjp, pad_axis

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _params(head_dim_padded: int, stages: int = 2):
    return plgpu.CompilerParams(num_warps=4 if head_dim_padded <= 64 else 8, num_stages=stages)


def _tile_mask(info: MaskInfo, offset, qi, kj, q_seg=None, k_seg=None):
    q_pos = offset + qi * info.block_q + jnp.arange(info.block_q)[:, None]
    k_pos = kj * info.block_k + jnp.arange(info.block_k)[None, :]
    mask = info.tile_mask(q_pos, k_pos)
    if q_seg is not None:
        seg = q_seg[:, None] == k_seg[None, :]
        mask = seg if mask is None else mask & seg
    return mask


def _loop_blocks(lo, hi, info: MaskInfo, needs_mask, body, carry, seg_live=None):
    """carry = body(idx, carry, masked) over blocks lo..hi, masked only where needed."""

    def step(idx, c):
        if seg_live is not None:  # segment ids: always masked, skip blocks whose ids cannot meet
            return jax.lax.cond(seg_live(idx), lambda c: body(idx, c, True), lambda c: c, c)
        masked = needs_mask(idx)
        if isinstance(masked, bool):  # no mask at all (not causal, no window, no padding)
            return body(idx, c, masked)
        return jax.lax.cond(masked, lambda c: body(idx, c, True), lambda c: body(idx, c, False), c)

    return jax.lax.fori_loop(lo, hi + 1, step, carry)


# ------------------------------------------------------------------------------ forward
def _fwd_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, info: MaskInfo, scale: float, head_dim: int):
    if info.has_segments:
        qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    i = pl.program_id(0)
    bq, bk = info.block_q, info.block_k
    dp = q_ref.shape[-1]
    dmask = (jnp.arange(dp) < head_dim)[None, :]
    offset = offset_ref[...]
    q = plgpu.load(q_ref, mask=dmask, other=0.0)
    q_seg = qseg_ref[...] if info.has_segments else None

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = plgpu.load(k_ref.at[rows, :], mask=dmask, other=0.0)
        v = plgpu.load(v_ref.at[rows, :], mask=dmask, other=0.0)
        s = _dot(q, k, NT) * scale
        mask = None
        if masked:
            k_seg = kseg_ref[rows] if info.has_segments else None
            mask = _tile_mask(info, offset, i, j, q_seg, k_seg)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, NN)
        return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1)

    seg_live = None
    if info.has_segments:
        q_lo, q_hi = jnp.min(q_seg), jnp.max(q_seg)

        def seg_live(j):
            k_seg = kseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)]
            return (jnp.max(k_seg) >= q_lo) & (jnp.min(k_seg) <= q_hi)

    lo, hi = info.kv_range(i, offset)
    init = (jnp.zeros((bq, dp), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = _loop_blocks(lo, hi, info, lambda j: info.block_needs_mask(i, j, offset), body, init, seg_live)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    plgpu.store(o_ref, (acc / l_safe[:, None]).astype(o_ref.dtype), mask=dmask)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(l_safe))


def _common_specs(info: MaskInfo, group: int, dp: int, by_kv_head: bool):
    """BlockSpecs of offset, whole-sequence K/V and segment ids for a (block, b, head) grid."""
    kv_head = (lambda h: h) if by_kv_head else (lambda h: h // group)
    offset_spec = pl.BlockSpec((None,), lambda x, b, h: (b,))
    kv_spec = pl.BlockSpec((None, info.kv_len_padded, None, dp), lambda x, b, h: (b, 0, kv_head(h), 0))
    seg_specs = [pl.BlockSpec((None, info.q_len_padded), lambda x, b, h: (b, 0)),
                 pl.BlockSpec((None, info.kv_len_padded), lambda x, b, h: (b, 0))]
    return offset_spec, kv_spec, seg_specs


def flash_fwd(q, k, v, offset, qseg, kseg, *, info: MaskInfo, scale: float, interpret=False):
    """q [B,Tp,H,D], k/v [B,Sp,KV,D] (padded) -> (o [B,Tp,H,D], lse [B,H,Tp] float32)."""
    batch, t_pad, heads, d = q.shape
    group = heads // k.shape[2]
    dp = max(16, pl.next_power_of_2(d))
    bq = info.block_q
    offset_spec, kv_spec, seg_specs = _common_specs(info, group, dp, by_kv_head=False)
    q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    in_specs = [offset_spec, q_spec, kv_spec, kv_spec]
    operands = [offset, q, k, v]
    if info.has_segments:
        # Query ids per block, key ids whole (sliced per key block in the loop).
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)), seg_specs[1]]
        operands += [qseg, kseg]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, info=info, scale=scale, head_dim=d),
        grid=(info.num_q_blocks, batch, heads), in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, t_pad), jnp.float32)],
        compiler_params=_params(dp), interpret=interpret, name="phi3_flash_fwd_gpu",
    )(*operands)


# ------------------------------------------------------------------------------ backward: dq
def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, info: MaskInfo, scale: float,
               head_dim: int):
    if info.has_segments:
        qseg_ref, kseg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    i = pl.program_id(0)
    bq, bk = info.block_q, info.block_k
    dp = q_ref.shape[-1]
    dmask = (jnp.arange(dp) < head_dim)[None, :]
    offset = offset_ref[...]
    q = plgpu.load(q_ref, mask=dmask, other=0.0)
    do = plgpu.load(do_ref, mask=dmask, other=0.0)
    lse, di = lse_ref[...], di_ref[...]
    q_seg = qseg_ref[...] if info.has_segments else None

    def body(j, dq, masked):
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        k = plgpu.load(k_ref.at[rows, :], mask=dmask, other=0.0)
        v = plgpu.load(v_ref.at[rows, :], mask=dmask, other=0.0)
        p = jnp.exp(_dot(q, k, NT) * scale - lse[:, None])
        mask = None
        if masked:
            k_seg = kseg_ref[rows] if info.has_segments else None
            mask = _tile_mask(info, offset, i, j, q_seg, k_seg)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot(do, v, NT) - di[:, None])
        return dq + _dot(ds.astype(k.dtype), k, NN)

    seg_live = None
    if info.has_segments:
        q_lo, q_hi = jnp.min(q_seg), jnp.max(q_seg)

        def seg_live(j):
            k_seg = kseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)]
            return (jnp.max(k_seg) >= q_lo) & (jnp.min(k_seg) <= q_hi)

    lo, hi = info.kv_range(i, offset)
    dq = _loop_blocks(lo, hi, info, lambda j: info.block_needs_mask(i, j, offset), body,
                      jnp.zeros((bq, dp), jnp.float32), seg_live)
    plgpu.store(dq_ref, (dq * scale).astype(dq_ref.dtype), mask=dmask)


def flash_bwd_dq(q, k, v, do, lse, di, offset, qseg, kseg, *, info: MaskInfo, scale: float, interpret=False):
    batch, _, heads, d = q.shape
    group = heads // k.shape[2]
    dp = max(16, pl.next_power_of_2(d))
    bq = info.block_q
    offset_spec, kv_spec, seg_specs = _common_specs(info, group, dp, by_kv_head=False)
    q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, b, h: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [offset_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands = [offset, q, k, v, do, lse, di]
    if info.has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)), seg_specs[1]]
        operands += [qseg, kseg]
    return pl.pallas_call(
        functools.partial(_dq_kernel, info=info, scale=scale, head_dim=d),
        grid=(info.num_q_blocks, batch, heads), in_specs=in_specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(dp), interpret=interpret, name="phi3_flash_bwd_dq_gpu",
    )(*operands)


# ------------------------------------------------------------------------------ backward: dk, dv
def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, info: MaskInfo, scale: float,
                head_dim: int, group: int):
    if info.has_segments:
        qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    j = pl.program_id(0)
    bq, bk = info.block_q, info.block_k
    dp = k_ref.shape[-1]
    dmask = (jnp.arange(dp) < head_dim)[None, :]
    offset = offset_ref[...]
    k = plgpu.load(k_ref, mask=dmask, other=0.0)
    v = plgpu.load(v_ref, mask=dmask, other=0.0)
    k_seg = kseg_ref[...] if info.has_segments else None

    def head(g, carry):
        def body(i, c, masked):
            dk, dv = c
            rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q = plgpu.load(q_ref.at[rows, g, :], mask=dmask, other=0.0)
            do = plgpu.load(do_ref.at[rows, g, :], mask=dmask, other=0.0)
            lse, di = lse_ref[g, rows], di_ref[g, rows]
            p = jnp.exp(_dot(q, k, NT) * scale - lse[:, None])  # [bq, bk]
            mask = None
            if masked:
                q_seg = qseg_ref[rows] if info.has_segments else None
                mask = _tile_mask(info, offset, i, j, q_seg, k_seg)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + _dot(p.astype(do.dtype), do, TN)
            ds = p * (_dot(do, v, NT) - di[:, None])
            return dk + _dot(ds.astype(q.dtype), q, TN), dv

        seg_live = None
        if info.has_segments:
            k_lo, k_hi = jnp.min(k_seg), jnp.max(k_seg)

            def seg_live(i):
                q_seg = qseg_ref[pl.ds(pl.multiple_of(i * bq, bq), bq)]
                return (jnp.max(q_seg) >= k_lo) & (jnp.min(q_seg) <= k_hi)

        lo, hi = info.q_range(j, offset)
        return _loop_blocks(lo, hi, info, lambda i: info.block_needs_mask(i, j, offset), body, carry, seg_live)

    zeros = jnp.zeros((bk, dp), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    plgpu.store(dk_ref, (dk * scale).astype(dk_ref.dtype), mask=dmask)
    plgpu.store(dv_ref, dv.astype(dv_ref.dtype), mask=dmask)


def flash_bwd_dkv(q, k, v, do, lse, di, offset, qseg, kseg, *, info: MaskInfo, scale: float, interpret=False):
    batch, _, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    dp = max(16, pl.next_power_of_2(d))
    bk = info.block_k
    offset_spec, _, seg_specs = _common_specs(info, group, dp, by_kv_head=True)
    q_spec = pl.BlockSpec((None, info.q_len_padded, group, dp), lambda j, b, h: (b, 0, h, 0))
    row_spec = pl.BlockSpec((None, group, info.q_len_padded), lambda j, b, h: (b, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, dp), lambda j, b, h: (b, j, h, 0))
    in_specs = [offset_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands = [offset, q, k, v, do, lse, di]
    if info.has_segments:
        in_specs += [seg_specs[0], pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
        operands += [qseg, kseg]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, info=info, scale=scale, head_dim=d, group=group),
        grid=(info.num_kv_blocks, batch, kv_heads), in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(dp), interpret=interpret, name="phi3_flash_bwd_dkv_gpu",
    )(*operands)


# ------------------------------------------------------------------------------ custom VJP
_flash = flash_with_vjp(flash_fwd, flash_bwd_dq, flash_bwd_dkv,
                        row_dot=lambda o, do: jnp.einsum("bthd,bthd->bht", o, do))


def gpu_flash_attention(q, k, v, offset, q_seg, kv_seg, *, causal, window, scale, blocks, interpret):
    """[B,T,H,D] x [B,S,KV,D] -> [B,T,H,D]: pad sequences to whole blocks, run, slice."""
    batch, t, h, d = q.shape
    s = k.shape[1]

    def pick(length, requested):  # a power of two >= 16, no longer than the sequence needs
        return max(16, min(pl.next_power_of_2(requested), pl.next_power_of_2(length)))

    fwd_info, bwd_info, qseg, kseg = flash_geometry(t, s, blocks, pick, causal=causal, window=window,
                                                    q_seg=q_seg, kv_seg=kv_seg)
    t_pad, s_pad = fwd_info.q_len_padded, fwd_info.kv_len_padded
    qp, kp, vp = pad_axis(q, 1, t_pad), pad_axis(k, 1, s_pad), pad_axis(v, 1, s_pad)
    o = _flash(qp, kp, vp, offset, qseg, kseg, fwd_info, bwd_info, scale, interpret)
    return o[:, :t]
