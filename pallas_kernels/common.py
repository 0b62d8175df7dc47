"""Shared pieces of the flash kernels: block sizes, which blocks a mask leaves alive, padding.

Block-range arithmetic is written once here and used by the TPU kernels (in index maps
and kernel bodies, on scalars) and the GPU kernels (as loop bounds): a query block i
sees key blocks lo..hi, a key block j is seen by query blocks lo..hi. Everything outside
those ranges is fully masked, so it is never loaded nor computed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.reference import MASK_VALUE

__all__ = ["MASK_VALUE", "BlockSizes", "MaskInfo", "round_up", "cdiv"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (rows of queries / keys per block) of the forward and backward kernels.

    None means the backend's default for the head_dim and GQA group size (see
    `tpu_defaults` / `gpu_defaults`). Sequence lengths need not be multiples of them.
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None

    def filled(self, defaults: BlockSizes) -> BlockSizes:
        return BlockSizes(*(own if own is not None else dflt
                            for own, dflt in zip(dataclasses.astuple(self), dataclasses.astuple(defaults),
                                                 strict=True)))


def tpu_defaults(head_dim: int, group: int) -> BlockSizes:
    """TPU: 128-multiples (lane width); fewer query rows per block when a block holds G heads."""
    del head_dim  # 64..128 all fit the same VMEM budget
    bq = 512 if group <= 2 else 256 if group <= 4 else 128
    return BlockSizes(block_q=bq, block_k=512, block_q_bwd=min(bq, 256), block_k_bwd=256)


def gpu_defaults(head_dim: int, group: int) -> BlockSizes:
    """GPU (Triton): 128x64 forward tiles, 64x64 backward, as FlashAttention-2 on Hopper/Ampere."""
    del group
    if head_dim <= 64:
        return BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
    return BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=32)


def _maximum(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _minimum(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """Static description of the mask plus block geometry, hashable (a jit static argument).

    q_len / kv_len are the real lengths; the kernels see arrays padded to q_len_padded /
    kv_len_padded (multiples of the block sizes). Query t of row b sits at key index
    q_offset[b] + t. Padding keys (index >= kv_len) are always masked.
    """

    q_len: int
    kv_len: int
    q_len_padded: int
    kv_len_padded: int
    block_q: int
    block_k: int
    causal: bool
    window: int | None
    has_segments: bool

    def __post_init__(self):
        if self.q_len_padded % self.block_q or self.kv_len_padded % self.block_k:
            raise ValueError(f"padded lengths must be block multiples: {self}")

    @property
    def num_q_blocks(self) -> int:
        return self.q_len_padded // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_len_padded // self.block_k

    @property
    def pads_kv(self) -> bool:
        return self.kv_len != self.kv_len_padded

    @property
    def kv_blocks_per_q_block(self) -> int:
        """Grid extent over key blocks for one query block (smaller than all with a window)."""
        if self.window is None or not self.causal:
            return self.num_kv_blocks
        return min(self.num_kv_blocks, cdiv(self.block_q + self.window - 1, self.block_k) + 1)

    @property
    def q_blocks_per_kv_block(self) -> int:
        if self.window is None or not self.causal:
            return self.num_q_blocks
        return min(self.num_q_blocks, cdiv(self.block_k + self.window - 1, self.block_q) + 1)

    # -- ranges: work on Python ints and on traced int32 scalars alike ------------------------
    def kv_range(self, i, offset):
        """Key blocks [lo, hi] that query block i (rows at offset + i*bq ...) can see."""
        bq, bk = self.block_q, self.block_k
        last = (self.kv_len - 1) // bk
        lo = 0
        if self.window is not None:
            lo = _maximum(offset + i * bq - self.window + 1, 0) // bk
        hi = last
        if self.causal:  # the block's last real query row (padding rows need no keys)
            hi = _minimum((offset + _minimum((i + 1) * bq, self.q_len) - 1) // bk, last)
        return lo, hi

    def q_range(self, j, offset):
        """Query blocks [lo, hi] that can see key block j (hi < lo when none can)."""
        bq, bk = self.block_q, self.block_k
        last = (self.q_len - 1) // bq
        lo = 0
        hi = last
        if self.window is not None:
            # Last query index that still sees key (j+1)*bk - 1: t <= (j+1)*bk + W - 2 - offset.
            top = (j + 1) * bk + self.window - 2 - offset
            hi = _minimum((_maximum(top, -bq) + bq) // bq - 1, last)
        if self.causal:  # first query row that sees key j*bk; none if past the last real row
            first_row = _maximum(j * bk - offset, 0)
            lo = first_row // bq
            # hi < lo when first_row >= q_len; integer min/max only (no selects: Triton-friendly).
            hi = _minimum(hi, lo + (_maximum(self.q_len - 1 - first_row, -1) + 1) * self.num_q_blocks - 1)
        return lo, hi

    def block_needs_mask(self, i, j, offset):
        """Whether causality, the window or key padding masks some element of tile (i, j).

        Segment ids are not considered here: each kernel checks them per block.
        """
        bq, bk = self.block_q, self.block_k
        need = False
        if self.causal:
            need = need | ((j + 1) * bk - 1 > offset + i * bq)
        if self.window is not None:
            need = need | (j * bk <= offset + (i + 1) * bq - 1 - self.window)
        if self.pads_kv:
            need = need | ((j + 1) * bk > self.kv_len)
        return need

    def tile_mask(self, q_pos, k_pos):
        """Elementwise mask from broadcastable query / key index arrays (segments not included)."""
        mask = None

        def conj(a, b):
            return b if a is None else a & b

        if self.causal:
            mask = conj(mask, k_pos <= q_pos)
        if self.window is not None:
            mask = conj(mask, k_pos > q_pos - self.window)
        if self.pads_kv:
            mask = conj(mask, k_pos < self.kv_len)
        return mask

    def live_tiles(self) -> int:
        """Tiles computed for one (row, kv head) with q_offset 0 (for cost estimates)."""
        total = 0
        for i in range(self.num_q_blocks):
            lo, hi = self.kv_range(i, 0)
            total += max(0, hi - lo + 1)
        return total


def pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    """Pad `axis` of x at the end up to `size` (no copy when already that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def block_segment_ranges(seg_bt: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-block min and max segment id, flattened to [B * num_blocks] int32 (for SMEM)."""
    b, t = seg_bt.shape
    blocks = seg_bt.reshape(b, t // block, block)
    return jnp.min(blocks, axis=-1).reshape(-1), jnp.max(blocks, axis=-1).reshape(-1)


def flash_geometry(q_len: int, kv_len: int, blocks: BlockSizes, pick: Callable[[int, int], int], *, causal: bool,
                   window: int | None, q_seg: jax.Array | None, kv_seg: jax.Array | None
                   ) -> tuple[MaskInfo, MaskInfo, jax.Array | None, jax.Array | None]:
    """(forward MaskInfo, backward MaskInfo, padded q segment ids, padded kv segment ids).

    `pick(length, requested)` is the backend's block-size rule; both passes share one padded
    length (a multiple of their blocks), and segment ids are padded by repeating the last id.
    """
    bq_f, bk_f = pick(q_len, blocks.block_q), pick(kv_len, blocks.block_k)
    bq_b, bk_b = pick(q_len, blocks.block_q_bwd), pick(kv_len, blocks.block_k_bwd)
    t_pad, s_pad = round_up(q_len, math.lcm(bq_f, bq_b)), round_up(kv_len, math.lcm(bk_f, bk_b))
    common = dict(q_len=q_len, kv_len=kv_len, q_len_padded=t_pad, kv_len_padded=s_pad, causal=causal,
                  window=window, has_segments=q_seg is not None)
    qseg = kseg = None
    if q_seg is not None:
        qseg = pad_axis(q_seg.astype(jnp.int32), 1, t_pad, mode="edge")
        kseg = pad_axis(kv_seg.astype(jnp.int32), 1, s_pad, mode="edge")
    return MaskInfo(block_q=bq_f, block_k=bk_f, **common), MaskInfo(block_q=bq_b, block_k=bk_b, **common), qseg, kseg


def flash_with_vjp(fwd: Callable, bwd_dq: Callable, bwd_dkv: Callable, row_dot: Callable) -> Callable:
    """One backend's flash kernels as a differentiable function
    `(q, k, v, offset, qseg, kseg, fwd_info, bwd_info, scale, interpret) -> o`.

    The backward is the flash-attention one: di = rowsum(o * do) (`row_dot`, in the layout the
    backend's kernels read), then one kernel for dq and one for dk and dv.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
    def flash(q, k, v, offset, qseg, kseg, fwd_info, bwd_info, scale, interpret):
        return fwd(q, k, v, offset, qseg, kseg, info=fwd_info, scale=scale, interpret=interpret)[0]

    def fwd_rule(q, k, v, offset, qseg, kseg, fwd_info, bwd_info, scale, interpret):
        o, lse = fwd(q, k, v, offset, qseg, kseg, info=fwd_info, scale=scale, interpret=interpret)
        return o, (q, k, v, offset, qseg, kseg, o, lse)

    def bwd_rule(fwd_info, bwd_info, scale, interpret, res, do):
        q, k, v, offset, qseg, kseg, o, lse = res
        di = row_dot(o.astype(jnp.float32), do.astype(jnp.float32))
        kw = dict(info=bwd_info, scale=scale, interpret=interpret)
        dq = bwd_dq(q, k, v, do, lse, di, offset, qseg, kseg, **kw)
        dk, dv = bwd_dkv(q, k, v, do, lse, di, offset, qseg, kseg, **kw)
        return dq, dk, dv, None, None, None

    flash.defvjp(fwd_rule, bwd_rule)
    return flash
