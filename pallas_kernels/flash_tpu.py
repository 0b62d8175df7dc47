"""Flash attention for TPU (Pallas / Mosaic): forward and backward with a custom VJP.

Layout inside the kernels: q and o as [B, KV, G, T, D] (the G query heads that share a kv
head sit in one block, so K and V are read once per group and never repeated in memory),
k and v as [B, KV, S, D]. The grid is (batch, kv head, query block, key block) for the
forward and dq kernels and (batch, kv head, key block, query block) for dk/dv; the last
axis is the reduction ("arbitrary"), the others are parallel.

Only the blocks a tile can see are visited: the grid's reduction axis is as short as the
sliding window allows, its index map starts at the first live block (per row: the query
offset is a scalar-prefetched array) and clamps at the last one, so a dead step neither
computes nor issues a new DMA. With segment ids, per-block min/max ids (scalar-prefetched
too) let a tile whose documents cannot meet skip its compute. Fully visible tiles run
without building a mask.

head_dim 64 and 96 stay unpadded in HBM: a block's last dim equals the array's, and Mosaic
pads to the 128-lane tile in VMEM. Sequence lengths are padded to whole blocks by the
wrapper (`pallas_kernels.flash`) and the padding keys masked, so callers pass any length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MaskInfo, block_segment_ranges, flash_geometry, flash_with_vjp, pad_axis, round_up

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
VMEM_LIMIT = 32 * 1024 * 1024  # well above what the default blocks use (< 10 MiB)
PARALLEL, ARBITRARY = "parallel", "arbitrary"


def interpret_arg(interpret):
    """pallas_call's `interpret` for a TPU kernel.

    True: the TPU interpreter (`pltpu.InterpretParams()`, TPU semantics: DMAs, semaphores,
    races); an InterpretParams object as given; "hlo": Pallas' generic interpreter, which
    (unlike the TPU interpreter in jax 0.10) also runs inside shard_map over several CPU
    devices; False: compile for the TPU.
    """
    if interpret is True:
        return pltpu.InterpretParams()
    if interpret == "hlo":
        return True
    return interpret or False


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT)


def _clamp(x, hi):
    return jnp.minimum(jnp.maximum(x, 0), jnp.maximum(hi, 0))


def _prefetch(offset, qseg, kseg, info: MaskInfo):
    """Scalar-prefetch operands: per-row query offsets, then per-block segment ranges."""
    if not info.has_segments:
        return (offset,)
    return (offset, *block_segment_ranges(qseg, info.block_q), *block_segment_ranges(kseg, info.block_k))


def _seg_status(info: MaskInfo, seg_refs, b, qi, kj):
    """(tile is dead, tile lies in one document) from per-block segment id ranges."""
    q_lo_ref, q_hi_ref, k_lo_ref, k_hi_ref = seg_refs
    qb = b * info.num_q_blocks + jnp.minimum(qi, info.num_q_blocks - 1)
    kb = b * info.num_kv_blocks + jnp.minimum(kj, info.num_kv_blocks - 1)
    q_lo, q_hi, k_lo, k_hi = q_lo_ref[qb], q_hi_ref[qb], k_lo_ref[kb], k_hi_ref[kb]
    dead = (q_hi < k_lo) | (k_hi < q_lo)
    uniform = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    return dead, uniform


def _tile_status(info: MaskInfo, seg_refs, b, qi, kj, live, offset):
    """(run the tile, the tile needs a mask)."""
    run = live
    needs_mask = info.block_needs_mask(qi, kj, offset)
    if info.has_segments:
        dead, uniform = _seg_status(info, seg_refs, b, qi, kj)
        run = run & ~dead
        needs_mask = needs_mask | ~uniform
    return run, jnp.asarray(needs_mask)


def _tile_mask(info: MaskInfo, offset, qi, kj, shape, q_axis, qseg=None, kseg=None):
    """Mask of one tile; q_axis says whether queries run down rows (0) or across lanes (1)."""
    q_pos = offset + qi * info.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = kj * info.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    mask = info.tile_mask(q_pos, k_pos)
    if qseg is not None:
        seg = qseg == kseg
        mask = seg if mask is None else mask & seg
    return mask


def _seg_specs(info: MaskInfo, q_block_index, kv_block_index):
    """Segment ids as [B, 1, T] rows (lane-dense) for the query and key blocks."""
    return [pl.BlockSpec((None, 1, info.block_q), lambda *a: (a[0], 0, q_block_index(*a))),
            pl.BlockSpec((None, 1, info.block_k), lambda *a: (a[0], 0, kv_block_index(*a)))]


def _cost(info: MaskInfo, batch, kv_heads, group, head_dim, itemsize, matmuls):
    tiles = info.live_tiles() * batch * kv_heads
    elems = tiles * info.block_q * info.block_k * group
    flops = 2 * matmuls * elems * head_dim
    qo_bytes = 2 * batch * kv_heads * group * info.q_len_padded * head_dim * itemsize
    kv_bytes = 2 * tiles * info.block_k * head_dim * itemsize
    return pl.CostEstimate(flops=int(flops), transcendentals=int(elems), bytes_accessed=int(qo_bytes + kv_bytes))


# ------------------------------------------------------------------------------ forward
def _fwd_kernel(*refs, info: MaskInfo, group: int, scale: float):
    offset_ref, seg_refs = refs[0], (refs[1:5] if info.has_segments else None)
    refs = refs[5:] if info.has_segments else refs[1:]
    q_ref, k_ref, v_ref, *refs = refs
    qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if info.has_segments else (None, None)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offset_ref[b]
    lo, hi = info.kv_range(i, offset)
    kj = lo + j
    bq, bk = info.block_q, info.block_k

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    run, needs_mask = _tile_status(info, seg_refs, b, i, kj, kj <= hi, offset)

    def body(masked: bool):
        k, v = k_ref[...], v_ref[...]
        mask = None
        if masked:
            segs = (jnp.expand_dims(qseg_ref[0], -1), kseg_ref[...]) if info.has_segments else (None, None)
            mask = _tile_mask(info, offset, i, kj, (bq, bk), 0, *segs)
        for g in range(group):
            s = jax.lax.dot_general(q_ref[g], k, NT, preferred_element_type=jnp.float32) * scale
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_prev = m_sc[g]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            # Rows that have seen no visible key yet keep m = -inf; shift them by 0 instead.
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            l_sc[g] = alpha * l_sc[g] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[g] = m_next
            pv = jax.lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
            acc_sc[g] = acc_sc[g] * alpha[:, :1] + pv

    pl.when(run & needs_mask)(functools.partial(body, True))
    pl.when(run & ~needs_mask)(functools.partial(body, False))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        for g in range(group):
            l = l_sc[g]
            empty = l == 0.0  # a row that sees no key at all: output 0, lse +inf (zero grads)
            l_safe = jnp.where(empty, 1.0, l)
            o_ref[g] = (acc_sc[g] * (1.0 / l_safe)[:, :1]).astype(o_ref.dtype)
            lse = jnp.where(empty, jnp.inf, m_sc[g] + jnp.log(l_safe))  # [bq, 128], lanes all equal
            lse_ref[g] = lse.T[:1]  # stored lane-dense: one [1, bq] row per head


def flash_fwd(q5, k4, v4, offset, qseg, kseg, *, info: MaskInfo, scale: float, interpret=False):
    """Forward: (o [B,KV,G,Tp,D], lse [B,KV,G,Tp] float32). Inputs already padded."""
    batch, kv_heads, group, t_pad, head_dim = q5.shape
    bq, bk = info.block_q, info.block_k

    def kv_index(b, h, i, j, offset_ref, *_):
        lo, hi = info.kv_range(i, offset_ref[b])
        return _clamp(lo + j, hi)

    q_spec = pl.BlockSpec((None, None, group, bq, head_dim), lambda b, h, i, j, *_: (b, h, 0, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j, *r: (b, h, kv_index(b, h, i, j, *r), 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    operands = [q5, k4, v4]
    if info.has_segments:
        in_specs += _seg_specs(info, lambda b, h, i, j, *_: i, kv_index)
        operands += [qseg[:, None, :], kseg[:, None, :]]
    out_specs = [q_spec, pl.BlockSpec((None, None, group, 1, bq), lambda b, h, i, j, *_: (b, h, 0, 0, i))]
    out_shape = [jax.ShapeDtypeStruct(q5.shape, q5.dtype),
                 jax.ShapeDtypeStruct((batch, kv_heads, group, 1, t_pad), jnp.float32)]
    prefetch = _prefetch(offset, qseg, kseg, info)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(batch, kv_heads, info.num_q_blocks, info.kv_blocks_per_q_block),
        in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((group, bq, LANES), jnp.float32), pltpu.VMEM((group, bq, LANES), jnp.float32),
                        pltpu.VMEM((group, bq, head_dim), jnp.float32)])
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, info=info, group=group, scale=scale),
        grid_spec=grid_spec, out_shape=out_shape,
        compiler_params=_compiler_params((PARALLEL, PARALLEL, PARALLEL, ARBITRARY)),
        cost_estimate=_cost(info, batch, kv_heads, group, head_dim, q5.dtype.itemsize, 2),
        interpret=interpret_arg(interpret), name="phi3_flash_fwd",
    )(*prefetch, *operands)
    return o, lse[:, :, :, 0]


# ------------------------------------------------------------------------------ backward: dq
def _dq_kernel(*refs, info: MaskInfo, group: int, scale: float):
    offset_ref, seg_refs = refs[0], (refs[1:5] if info.has_segments else None)
    refs = refs[5:] if info.has_segments else refs[1:]
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs = refs
    qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if info.has_segments else (None, None)
    dq_ref, dq_sc = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offset_ref[b]
    lo, hi = info.kv_range(i, offset)
    kj = lo + j
    bq, bk = info.block_q, info.block_k

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    run, needs_mask = _tile_status(info, seg_refs, b, i, kj, kj <= hi, offset)

    def body(masked: bool):
        k, v = k_ref[...], v_ref[...]
        mask = None
        if masked:
            segs = (jnp.expand_dims(qseg_ref[0], -1), kseg_ref[...]) if info.has_segments else (None, None)
            mask = _tile_mask(info, offset, i, kj, (bq, bk), 0, *segs)
        for g in range(group):
            q, do = q_ref[g], do_ref[g]
            lse = jnp.expand_dims(lse_ref[g][0], -1)
            di = jnp.expand_dims(di_ref[g][0], -1)
            s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
            p = jnp.exp(s - lse)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dp = jax.lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
            ds = p * (dp - di)
            dq_sc[g] += jax.lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    pl.when(run & needs_mask)(functools.partial(body, True))
    pl.when(run & ~needs_mask)(functools.partial(body, False))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def flash_bwd_dq(q5, k4, v4, do5, lse, di, offset, qseg, kseg, *, info: MaskInfo, scale: float, interpret=False):
    batch, kv_heads, group, _, head_dim = q5.shape
    bq, bk = info.block_q, info.block_k

    def kv_index(b, h, i, j, offset_ref, *_):
        lo, hi = info.kv_range(i, offset_ref[b])
        return _clamp(lo + j, hi)

    q_spec = pl.BlockSpec((None, None, group, bq, head_dim), lambda b, h, i, j, *_: (b, h, 0, i, 0))
    row_spec = pl.BlockSpec((None, None, group, 1, bq), lambda b, h, i, j, *_: (b, h, 0, 0, i))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j, *r: (b, h, kv_index(b, h, i, j, *r), 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands = [q5, k4, v4, do5, lse[:, :, :, None, :], di[:, :, :, None, :]]
    if info.has_segments:
        in_specs += _seg_specs(info, lambda b, h, i, j, *_: i, kv_index)
        operands += [qseg[:, None, :], kseg[:, None, :]]
    prefetch = _prefetch(offset, qseg, kseg, info)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(batch, kv_heads, info.num_q_blocks, info.kv_blocks_per_q_block),
        in_specs=in_specs, out_specs=q_spec, scratch_shapes=[pltpu.VMEM((group, bq, head_dim), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_dq_kernel, info=info, group=group, scale=scale),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_compiler_params((PARALLEL, PARALLEL, PARALLEL, ARBITRARY)),
        cost_estimate=_cost(info, batch, kv_heads, group, head_dim, q5.dtype.itemsize, 3),
        interpret=interpret_arg(interpret), name="phi3_flash_bwd_dq",
    )(*prefetch, *operands)


# ------------------------------------------------------------------------------ backward: dk, dv
def _dkv_kernel(*refs, info: MaskInfo, group: int, scale: float):
    offset_ref, seg_refs = refs[0], (refs[1:5] if info.has_segments else None)
    refs = refs[5:] if info.has_segments else refs[1:]
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs = refs
    qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if info.has_segments else (None, None)
    dk_ref, dv_ref, dk_sc, dv_sc = refs
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offset_ref[b]
    lo, hi = info.q_range(j, offset)
    qi = lo + i
    bq, bk = info.block_q, info.block_k

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    run, needs_mask = _tile_status(info, seg_refs, b, qi, j, qi <= hi, offset)

    def body(masked: bool):
        # Transposed tiles [keys, queries]: lse and di arrive as lane-dense rows.
        k, v = k_ref[...], v_ref[...]
        mask = None
        if masked:
            segs = (qseg_ref[...], jnp.expand_dims(kseg_ref[0], -1)) if info.has_segments else (None, None)
            mask = _tile_mask(info, offset, qi, j, (bk, bq), 1, *segs)
        dk = jnp.zeros((bk, k.shape[-1]), jnp.float32)
        dv = jnp.zeros((bk, v.shape[-1]), jnp.float32)
        for g in range(group):
            q, do = q_ref[g], do_ref[g]
            s_t = jax.lax.dot_general(k, q, NT, preferred_element_type=jnp.float32) * scale
            p_t = jnp.exp(s_t - lse_ref[g])
            if mask is not None:
                p_t = jnp.where(mask, p_t, 0.0)
            dv += jax.lax.dot_general(p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
            dp_t = jax.lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
            ds_t = p_t * (dp_t - di_ref[g])
            dk += jax.lax.dot_general(ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
        dk_sc[...] += dk
        dv_sc[...] += dv

    pl.when(run & needs_mask)(functools.partial(body, True))
    pl.when(run & ~needs_mask)(functools.partial(body, False))

    @pl.when(i == pl.num_programs(3) - 1)
    def _finalize():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def flash_bwd_dkv(q5, k4, v4, do5, lse, di, offset, qseg, kseg, *, info: MaskInfo, scale: float, interpret=False):
    batch, kv_heads, group, _, head_dim = q5.shape
    bq, bk = info.block_q, info.block_k

    def q_index(b, h, j, i, offset_ref, *_):
        lo, hi = info.q_range(j, offset_ref[b])
        return _clamp(lo + i, hi)

    q_spec = pl.BlockSpec((None, None, group, bq, head_dim),
                          lambda b, h, j, i, *r: (b, h, 0, q_index(b, h, j, i, *r), 0))
    row_spec = pl.BlockSpec((None, None, group, 1, bq),
                            lambda b, h, j, i, *r: (b, h, 0, 0, q_index(b, h, j, i, *r)))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, i, *_: (b, h, j, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    operands = [q5, k4, v4, do5, lse[:, :, :, None, :], di[:, :, :, None, :]]
    if info.has_segments:
        in_specs += _seg_specs(info, q_index, lambda b, h, j, i, *_: j)
        operands += [qseg[:, None, :], kseg[:, None, :]]
    prefetch = _prefetch(offset, qseg, kseg, info)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=(batch, kv_heads, info.num_kv_blocks, info.q_blocks_per_kv_block),
        in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_dkv_kernel, info=info, group=group, scale=scale),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k4.shape, k4.dtype), jax.ShapeDtypeStruct(v4.shape, v4.dtype)],
        compiler_params=_compiler_params((PARALLEL, PARALLEL, PARALLEL, ARBITRARY)),
        cost_estimate=_cost(info, batch, kv_heads, group, head_dim, q5.dtype.itemsize, 4),
        interpret=interpret_arg(interpret), name="phi3_flash_bwd_dkv",
    )(*prefetch, *operands)


# ------------------------------------------------------------------------------ custom VJP
_flash = flash_with_vjp(flash_fwd, flash_bwd_dq, flash_bwd_dkv, row_dot=lambda o5, do5: jnp.sum(o5 * do5, axis=-1))


def tpu_flash_attention(q, k, v, offset, q_seg, kv_seg, *, causal, window, scale, blocks, interpret):
    """[B,T,H,D] x [B,S,KV,D] -> [B,T,H,D]: pad and regroup, run the kernels, undo."""
    batch, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    group = h // kv

    def pick(length, requested):  # a 128-multiple no longer than the (128-rounded) sequence
        return max(LANES, min(round_up(requested, LANES), round_up(length, LANES)))

    fwd_info, bwd_info, qseg, kseg = flash_geometry(t, s, blocks, pick, causal=causal, window=window,
                                                    q_seg=q_seg, kv_seg=kv_seg)
    t_pad, s_pad = fwd_info.q_len_padded, fwd_info.kv_len_padded

    q5 = pad_axis(q, 1, t_pad).reshape(batch, t_pad, kv, group, d).transpose(0, 2, 3, 1, 4)
    k4 = pad_axis(k, 1, s_pad).transpose(0, 2, 1, 3)
    v4 = pad_axis(v, 1, s_pad).transpose(0, 2, 1, 3)
    o5 = _flash(q5, k4, v4, offset, qseg, kseg, fwd_info, bwd_info, scale, interpret)
    return o5.transpose(0, 3, 1, 2, 4).reshape(batch, t_pad, h, d)[:, :t]
