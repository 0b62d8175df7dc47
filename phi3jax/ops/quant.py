"""Blockwise weight quantization for QLoRA's frozen base: int8 (absmax) and nf4 (QLoRA's NormalFloat4).

A weight is split into blocks of `block_size(n)` consecutive elements along one input (contracted)
axis; each block keeps its absmax as a float32 scale. A quantized weight is a dict that names its
format, so any pytree code (sharding, scan, checkpointing) handles it like an array:

    {"int8": int8 [.., n/B, B, ..],   "scale": float32 [.., n/B, 1, ..]}     q = round(127 w / absmax)
    {"nf4": uint8 [.., n/B, B/2, ..], "scale": float32 [.., n/B, 1, ..]}     two 4-bit codes per byte

`quantize` runs on the host (numpy; the loaders call it one layer's leaf at a time, so the full
precision model never exists in memory), `dequantize` on the device inside the model's layer, so
at most one layer's weight is ever expanded (XLA fuses the expansion into the matmul's operand).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

QUANT_FORMATS = ("int8", "nf4")
MAX_BLOCK = 64
# The 16 NormalFloat4 values (Dettmers et al. 2023, as bitsandbytes stores them).
NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2


def block_size(n: int) -> int:
    """Elements per block along an axis of length n: 64, or the largest power of two dividing n."""
    size = MAX_BLOCK
    while n % size:
        size //= 2
    if size < 2:
        raise ValueError(f"an axis of length {n} cannot be split into blocks of an even size; quantization "
                         "needs the input dimensions of the projections to be even")
    return size


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, dict) and "scale" in leaf and any(f in leaf for f in QUANT_FORMATS)


def quant_format(leaf: dict[str, Any]) -> str:
    return next(f for f in QUANT_FORMATS if f in leaf)


def quantize(w: np.ndarray, fmt: str, axis: int) -> dict[str, np.ndarray]:
    """Blockwise-quantize `w` along `axis` (host numpy; float32 math whatever w's dtype)."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; use one of {QUANT_FORMATS}")
    w = np.asarray(w, np.float32)
    axis = axis % w.ndim
    n = w.shape[axis]
    b = block_size(n)
    blocks = w.reshape(w.shape[:axis] + (n // b, b) + w.shape[axis + 1:])
    absmax = np.max(np.abs(blocks), axis=axis + 1, keepdims=True)
    safe = np.where(absmax > 0, absmax, 1.0)
    x = blocks / safe
    if fmt == "int8":
        return {"int8": np.clip(np.rint(x * 127.0), -127, 127).astype(np.int8), "scale": absmax}
    codes = np.searchsorted(_NF4_MIDPOINTS, x).astype(np.uint8)  # nearest of the 16 values
    lo = np.take(codes, np.arange(0, b, 2), axis=axis + 1)
    hi = np.take(codes, np.arange(1, b, 2), axis=axis + 1)
    return {"nf4": lo | (hi << 4), "scale": absmax}


def dequantize(leaf: dict[str, Any], axis: int, dtype: Any = jnp.float32) -> Any:
    """The weight a `quantize` dict stands for, in `dtype` (jit-able; `axis` as given to quantize,
    counted from the front of the unblocked weight)."""
    scale = jnp.asarray(leaf["scale"], jnp.float32)
    axis = axis % (scale.ndim - 1)
    if "int8" in leaf:
        blocks = jnp.asarray(leaf["int8"]).astype(jnp.float32) * (scale / 127.0)
    else:
        packed = jnp.asarray(leaf["nf4"])
        codes = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 2)  # [.., n/B, B/2, 2, ..]
        codes = codes.reshape(packed.shape[:axis + 1] + (2 * packed.shape[axis + 1],) + packed.shape[axis + 2:])
        blocks = jnp.asarray(NF4_CODES)[codes.astype(jnp.int32)] * scale
    shape = blocks.shape[:axis] + (blocks.shape[axis] * blocks.shape[axis + 1],) + blocks.shape[axis + 2:]
    return blocks.reshape(shape).astype(dtype)


def quantized_names(names: tuple[Any, ...], axis: int) -> tuple[Any, ...]:
    """Logical axis names of a quantized leaf's arrays: the blocked axis keeps its name, the new
    within-block axis is unsharded."""
    axis = axis % len(names)
    return tuple(names[:axis + 1]) + (None,) + tuple(names[axis + 1:])


def quantized_shapes(shape: tuple[int, ...], fmt: str, axis: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{format: (shape, dtype), "scale": (shape, float32)} of a quantized weight of `shape`."""
    axis = axis % len(shape)
    b = block_size(shape[axis])
    pre, post = tuple(shape[:axis]), tuple(shape[axis + 1:])
    values = pre + (shape[axis] // b, b if fmt == "int8" else b // 2) + post
    return {fmt: (values, np.int8 if fmt == "int8" else np.uint8), "scale": (pre + (shape[axis] // b, 1) + post,
                                                                             np.float32)}
