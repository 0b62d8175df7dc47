"""The one map between Hugging Face's Phi-3 tensors and phi3jax's parameters, as a table.

Every reader and writer goes through `hf_keys(cfg)`: `load_hf` (whole or per device's block),
`save_hf`, the orbax <-> HF converters and the GGUF export. Each `Key` says how one phi3jax leaf
is cut from one HF tensor:

    HF tensor (.weight)                  GGUF (llama.cpp)  rows       phi3jax leaf      shape
    model.embed_tokens                   token_embd        all        embed             [V, D] (as is)
    model.layers.{l}.self_attn.qkv_proj  blk.{l}.attn_qkv  all        attn/qkv          [D, 3, H, hd] (MHA)
                                                           [0, H hd)  attn/q            [D, H, hd]     (GQA)
                                                           the rest   attn/kv           [D, 2, KV, hd] (GQA)
    model.layers.{l}.self_attn.o_proj    blk.{l}.attn_output          attn/o            [H, hd, D]
    model.layers.{l}.mlp.gate_up_proj    blk.{l}.ffn_up               mlp/gate_up       [D, 2, I] (gate first)
    model.layers.{l}.mlp.down_proj       blk.{l}.ffn_down             mlp/down          [I, D]
    model.layers.{l}.input_layernorm     blk.{l}.attn_norm            attn_norm/scale   [D]
    model.layers.{l}.post_attention_layernorm  blk.{l}.ffn_norm       mlp_norm/scale    [D]
    model.norm                           output_norm                  final_norm/scale  [D]
    lm_head                              output                       lm_head           [D, V] (absent when tied)

HF stores a Linear weight PyTorch-style, [out, in]. A phi3jax linear leaf is the same numbers with
the input first and both sides split into named dims: leaf = rows.reshape(*out_dims, *in_dims)
transposed to (*in_dims, *out_dims). The map is pure reshapes and transposes, so a round trip is
bit-identical, and a block of a leaf (one device's shard) maps to a few row and column runs of
the HF tensor (`block_runs`), so sharded loading reads only those.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np

from phi3jax.config import Phi3Config

Runs = list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Key:
    hf: str  # the HF tensor; "{l}" stands for the layer index
    gguf: str  # llama.cpp's name of the same tensor
    leaf: str  # the phi3jax leaf: a top-level path ("embed") or one under `layers` ("attn/kv")
    out_dims: tuple[int, ...]  # the leaf's dims taken from the HF rows, in order
    in_dims: tuple[int, ...] = ()  # the leaf's dims taken from the HF columns; () = stored as is
    row_start: int = 0  # first HF row of this leaf (q and kv share qkv_proj)

    @property
    def per_layer(self) -> bool:
        return "{l}" in self.hf

    @property
    def shape(self) -> tuple[int, ...]:
        """The leaf's shape (one layer's, for a per-layer key)."""
        return (*self.in_dims, *self.out_dims)

    @property
    def num_rows(self) -> int:
        return math.prod(self.out_dims) if self.in_dims else self.out_dims[0]

    def hf_name(self, layer: int | None = None) -> str:
        return self.hf.format(l=layer)

    def gguf_name(self, layer: int | None = None) -> str:
        return self.gguf.format(l=layer)

    def to_ours(self, rows: np.ndarray, out_dims: tuple[int, ...] | None = None,
                in_dims: tuple[int, ...] | None = None) -> np.ndarray:
        """The leaf (or a block of it, given the block's dims) from its HF rows [rows, cols]."""
        out_dims, in_dims = out_dims or self.out_dims, self.in_dims if in_dims is None else in_dims
        if not self.in_dims:
            return rows.reshape(out_dims)
        n_out, n_in = len(out_dims), len(in_dims)
        perm = (*range(n_out, n_out + n_in), *range(n_out))
        return rows.reshape(*out_dims, *in_dims).transpose(perm)

    def to_hf(self, leaf: np.ndarray) -> np.ndarray:
        """The HF rows of this leaf: [num_rows, cols] (or the 1-D / table tensor as is)."""
        if not self.in_dims:
            return leaf
        n_in = len(self.in_dims)
        perm = (*range(n_in, leaf.ndim), *range(n_in))
        return np.ascontiguousarray(leaf.transpose(perm)).reshape(self.num_rows, math.prod(self.in_dims))

    def block_runs(self, index: tuple[slice, ...]) -> tuple[Runs, Runs]:
        """(HF row runs, HF column runs) holding the block `index` of the leaf (one layer's dims).

        Read in order and concatenated (rows, then columns), they give the block's HF rows in the
        order `to_ours(rows, block out dims, block in dims)` expects.
        """
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape, strict=True)]
        in_bounds, out_bounds = bounds[:len(self.in_dims)], bounds[len(self.in_dims):]
        if not self.in_dims:
            return [(self.row_start + out_bounds[0][0], self.row_start + out_bounds[0][1])], _runs(
                out_bounds[1:], self.out_dims[1:]) if len(self.out_dims) > 1 else []
        rows = [(self.row_start + lo, self.row_start + hi) for lo, hi in _runs(out_bounds, self.out_dims)]
        return rows, _runs(in_bounds, self.in_dims)


def _runs(bounds: list[tuple[int, int]], dims: tuple[int, ...]) -> Runs:
    """Contiguous runs of the row-major flat indices of a block [lo, hi) per dim of an array `dims`."""
    split = len(dims) - 1  # the last dim whose range is partial; every dim after it is whole
    while split > 0 and bounds[split] == (0, dims[split]):
        split -= 1
    stride = math.prod(dims[split + 1:])
    runs = []
    for prefix in itertools.product(*(range(lo, hi) for lo, hi in bounds[:split])):
        base = sum(i * math.prod(dims[d + 1:]) for d, i in enumerate(prefix))
        lo, hi = bounds[split]
        runs.append((base + lo * stride, base + hi * stride))
    return runs


def hf_keys(cfg: Phi3Config) -> list[Key]:
    """Every tensor of a HF Phi-3 checkpoint of this config, as keys, in HF's file order."""
    d, h, kv, hd, i, v = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    hf, blk = "model.layers.{l}.", "blk.{l}."
    qkv = (hf + "self_attn.qkv_proj.weight", blk + "attn_qkv.weight")
    if h == kv:
        attn = [Key(*qkv, "attn/qkv", (3, h, hd), (d,))]
    else:
        attn = [Key(*qkv, "attn/q", (h, hd), (d,)), Key(*qkv, "attn/kv", (2, kv, hd), (d,), row_start=h * hd)]
    layer = [*attn,
             Key(hf + "self_attn.o_proj.weight", blk + "attn_output.weight", "attn/o", (d,), (h, hd)),
             Key(hf + "mlp.gate_up_proj.weight", blk + "ffn_up.weight", "mlp/gate_up", (2, i), (d,)),
             Key(hf + "mlp.down_proj.weight", blk + "ffn_down.weight", "mlp/down", (d,), (i,)),
             Key(hf + "input_layernorm.weight", blk + "attn_norm.weight", "attn_norm/scale", (d,)),
             Key(hf + "post_attention_layernorm.weight", blk + "ffn_norm.weight", "mlp_norm/scale", (d,))]
    head = [] if cfg.tie_word_embeddings else [Key("lm_head.weight", "output.weight", "lm_head", (v,), (d,))]
    return [Key("model.embed_tokens.weight", "token_embd.weight", "embed", (v, d)), *layer,
            Key("model.norm.weight", "output_norm.weight", "final_norm/scale", (d,)), *head]


def layer_keys(cfg: Phi3Config) -> list[Key]:
    return [k for k in hf_keys(cfg) if k.per_layer]


def _tensors(cfg: Phi3Config) -> list[tuple[str, int | None, list[Key]]]:
    """(HF tensor template, layer or None, its keys by row) for every tensor, in HF's file order:
    the embedding, then layer by layer, then the rest."""
    by_tensor: dict[str, list[Key]] = {}
    for key in hf_keys(cfg):
        by_tensor.setdefault(key.hf, []).append(key)
    layer = [t for t, ks in by_tensor.items() if ks[0].per_layer]
    top = [t for t in by_tensor if t not in layer]
    order = [(top[0], None)] + [(t, l) for l in range(cfg.num_hidden_layers) for t in layer]
    order += [(t, None) for t in top[1:]]
    return [(t, l, sorted(by_tensor[t], key=lambda k: k.row_start)) for t, l in order]


def hf_shapes(cfg: Phi3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name a HF Phi-3 checkpoint of this config holds, with its shape, in file order."""
    shapes = {}
    for template, layer, keys in _tensors(cfg):
        rows = sum(k.num_rows for k in keys)
        shapes[template.format(l=layer)] = (rows, math.prod(keys[0].in_dims)) if keys[0].in_dims else keys[0].out_dims
    return shapes


def gguf_names(cfg: Phi3Config) -> dict[str, str]:
    """HF tensor name -> llama.cpp's name, for every tensor of this config."""
    return {keys[0].hf_name(layer): keys[0].gguf_name(layer) for _, layer, keys in _tensors(cfg)}


def hf_tensors_of(cfg: Phi3Config, leaf: Callable[[Key, int | None], np.ndarray]
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) in file order, each built from the leaves `leaf(key, layer)` gives."""
    for template, layer, keys in _tensors(cfg):
        parts = [k.to_hf(leaf(k, layer)) for k in keys]
        yield template.format(l=layer), parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
