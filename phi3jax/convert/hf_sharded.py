"""Sharded loading of Hugging Face checkpoints: each device's block read straight from safetensors.

`load_hf(dir, mesh=mesh)` lands here. Every parameter is built with
`jax.make_array_from_callback`: for each device this process owns, the callback computes which
rows and columns of which HF tensors that device's block of the phi3jax leaf comes from and
reads just those (`safe_open(...).get_slice(name)[rows, cols]`). No process reads, and no host
or device holds, a whole parameter unless its sharding says that device holds it whole.

The index arithmetic mirrors `hf.layer_from_hf` (the unsharded mapping):
    q / k / v [D, H|KV, hd]  <- qkv_proj rows (q heads, then k, then v) x hd, columns D
    o [H, hd, D]             <- o_proj [D, H*hd], transposed
    gate / up [D, I]         <- gate_up_proj rows [0, I) / [I, 2I), transposed
    down [I, D]              <- down_proj [D, I], transposed
    embed [V, D], lm_head [D, V] <- embed_tokens / lm_head [V, D]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from phi3jax.config import Phi3Config
from phi3jax.model import Params

Index = tuple[slice, ...]


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"strided shard index {s} is not supported")
    return start, stop


class SliceReader:
    """Blocks of HF tensors, read with safetensors' lazy slicing (only the requested bytes)."""

    def __init__(self, files: dict[str, str], dtype: np.dtype):
        self.files, self.dtype = files, dtype
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0

    def __call__(self, name: str, *index: tuple[int, int]) -> np.ndarray:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="np")
        block = self._handles[file].get_slice(name)[tuple(slice(lo, hi) for lo, hi in index)]
        self.bytes_read += block.nbytes
        return np.asarray(block).astype(self.dtype, copy=False)


def _layer(l: int, name: str) -> str:
    return f"model.layers.{l}.{name}"


def _layer_block(read: SliceReader, cfg: Phi3Config, leaf: str, l: int, index: Index,
                 shape: tuple[int, ...]) -> np.ndarray:
    """Layer l's block `index` of the stacked leaf `leaf` (index and shape without the layer axis)."""
    h, kv, hd, i = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    b = [_bounds(s, n) for s, n in zip(index, shape, strict=True)]
    if leaf in ("attn/q", "attn/k", "attn/v"):
        (d0, d1), (h0, h1), (k0, k1) = b
        first = {"attn/q": 0, "attn/k": h, "attn/v": h + kv}[leaf]  # the leaf's first head row block
        rows = read(_layer(l, "self_attn.qkv_proj.weight"), ((first + h0) * hd, (first + h1) * hd), (d0, d1))
        return rows.reshape(h1 - h0, hd, d1 - d0).transpose(2, 0, 1)[:, :, k0:k1]
    if leaf == "attn/o":
        (h0, h1), (k0, k1), (d0, d1) = b
        cols = read(_layer(l, "self_attn.o_proj.weight"), (d0, d1), (h0 * hd, h1 * hd))
        return cols.T.reshape(h1 - h0, hd, d1 - d0)[:, k0:k1, :]
    if leaf in ("mlp/gate", "mlp/up"):
        (d0, d1), (f0, f1) = b
        off = 0 if leaf == "mlp/gate" else i
        return read(_layer(l, "mlp.gate_up_proj.weight"), (off + f0, off + f1), (d0, d1)).T
    if leaf == "mlp/down":
        (f0, f1), (d0, d1) = b
        return read(_layer(l, "mlp.down_proj.weight"), (d0, d1), (f0, f1)).T
    if leaf in ("attn_norm/scale", "mlp_norm/scale"):
        name = "input_layernorm.weight" if leaf == "attn_norm/scale" else "post_attention_layernorm.weight"
        return read(_layer(l, name), b[0])
    raise KeyError(leaf)


def _block_reader(read: SliceReader, cfg: Phi3Config, path: str, shape: tuple[int, ...]
                  ) -> Callable[[Index], np.ndarray]:
    if path == "embed":
        return lambda idx: read("model.embed_tokens.weight", *(_bounds(s, n) for s, n in zip(idx, shape, strict=True)))
    if path == "lm_head":  # [D, V] from [V, D]
        return lambda idx: read("lm_head.weight", _bounds(idx[1], shape[1]), _bounds(idx[0], shape[0])).T
    if path == "final_norm/scale":
        return lambda idx: read("model.norm.weight", _bounds(idx[0], shape[0]))
    leaf = path.removeprefix("layers/")

    def stacked(idx: Index) -> np.ndarray:
        l0, l1 = _bounds(idx[0], shape[0])
        return np.stack([_layer_block(read, cfg, leaf, l, idx[1:], shape[1:]) for l in range(l0, l1)])

    return stacked


def load_sharded(files: dict[str, str], cfg: Phi3Config, dtype: np.dtype, mesh: jax.sharding.Mesh) -> Params:
    """The params tree of a validated HF checkpoint (`files`: tensor name -> safetensors file),
    every leaf placed per `phi3jax.sharding` rules on `mesh`, each device's block read on its own."""
    from phi3jax.model import abstract_params
    from phi3jax.sharding import param_shardings

    read = SliceReader(files, np.dtype(dtype))
    shardings = param_shardings(cfg, mesh)
    memo: dict[tuple[str, tuple[tuple[int, int], ...]], np.ndarray] = {}

    def build(path_keys: tuple[Any, ...], abstract: jax.ShapeDtypeStruct, sharding: Any) -> jax.Array:
        path = "/".join(getattr(k, "key", str(k)) for k in path_keys)
        shape = tuple(abstract.shape)
        block = _block_reader(read, cfg, path, shape)

        def callback(idx: Index) -> np.ndarray:
            key = (path, tuple(_bounds(s, n) for s, n in zip(idx, shape, strict=True)))
            if key not in memo:  # devices holding the same block (replicas) share one read
                memo[key] = np.ascontiguousarray(block(idx))
            return memo[key]

        return jax.make_array_from_callback(shape, sharding, callback)

    abstract = abstract_params(cfg)
    return jax.tree_util.tree_map_with_path(build, abstract, shardings)
