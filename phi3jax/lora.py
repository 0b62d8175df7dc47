"""LoRA adapters and the frozen (optionally quantized) base they train against.

The model owns the math (`phi3jax.model`: `Phi3(cfg, lora=LoraConfig(...))` reads the adapters from
the `lora` variable collection); this module owns the trees around it:

    adapters = init_adapters(cfg, lora, rng)           # {"layers": {"attn": {"qkv_a": ..}, ..}}, float32
    base = quantize_base(params, lora)                 # projections int8 / nf4 (QLoRA) or cast
    logits, _ = Phi3(cfg, lora=lora).apply({"params": base, "lora": adapters}, tokens, positions)
    dense = merge(base, adapters, cfg, lora)           # W + scale * A B: a plain model again

Adapter layout (per layer; `B` keeps its base weight's output axes, so it shards like them):

    target   base leaf(s)        A                       B
    qkv      attn/qkv            qkv_a [embed, r]        qkv_b [r, 3, heads, hd]
             (GQA) attn/q, kv    qkv_a (shared)          q_b [r, heads, hd], kv_b [r, 2, kv, hd]
    o        attn/o              o_a [heads, hd, r]      o_b [r, embed]
    gate_up  mlp/gate_up         gate_up_a [embed, r]    gate_up_b [r, 2, mlp]
    down     mlp/down            down_a [mlp, r]         down_b [r, embed]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.model import Params, Phi3, abstract_params, layers_stacked, param_logical_axes
from phi3jax.ops import quant
from phi3jax.parallel import check_model_fits_mesh
from phi3jax.parallel.axes import rules_for, tree_shardings


@dataclasses.dataclass(frozen=True)
class Projection:
    """One frozen projection weight and the adapter leaves that modify it."""

    target: str  # the LoRA target (HF module name without _proj)
    leaf: str  # the base leaf under a layer, e.g. "attn/qkv"
    a: str  # the A leaf (same subtree)
    b: str  # the B leaf
    n_in: int  # leading axes of the base weight that are contracted (its input)


def projections(cfg: Phi3Config) -> list[Projection]:
    """Every projection of a layer, in HF's order (qkv, o, gate_up, down)."""
    if cfg.num_attention_heads == cfg.num_key_value_heads:
        qkv = [Projection("qkv", "attn/qkv", "attn/qkv_a", "attn/qkv_b", 1)]
    else:
        qkv = [Projection("qkv", "attn/q", "attn/qkv_a", "attn/q_b", 1),
               Projection("qkv", "attn/kv", "attn/qkv_a", "attn/kv_b", 1)]
    return qkv + [Projection("o", "attn/o", "attn/o_a", "attn/o_b", 2),
                  Projection("gate_up", "mlp/gate_up", "mlp/gate_up_a", "mlp/gate_up_b", 1),
                  Projection("down", "mlp/down", "mlp/down_a", "mlp/down_b", 1)]


def get(tree: Params, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def set_leaf(tree: Params, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def _layer_trees(params: Params) -> list[tuple[str, Params]]:
    """(key, subtree) of the layer leaves: ("layers", stacked) or ("layers_<i>", one layer) each."""
    if layers_stacked(params):
        return [("layers", params["layers"])]
    return [(k, v) for k, v in params.items() if k.startswith("layers_")]


# ---------------------------------------------------------------------------- adapters
def _init_lora(cfg: Phi3Config, lora: LoraConfig, rng: jax.Array) -> Any:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Phi3(cfg, lora=lora).init(rng, tokens, tokens)["lora"]


def init_adapters(cfg: Phi3Config, lora: LoraConfig, rng: jax.Array | int = 0) -> Params:
    """Fresh adapters (A random, B zero: the adapted model starts as the base), layers stacked."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return nn.meta.unbox(jax.jit(_init_lora, static_argnums=(0, 1))(cfg, lora, rng))


def abstract_adapters(cfg: Phi3Config, lora: LoraConfig) -> Params:
    return nn.meta.unbox(jax.eval_shape(lambda: _init_lora(cfg, lora, jax.random.key(0))))


def adapter_shardings(cfg: Phi3Config, lora: LoraConfig, mesh: Any) -> Params:
    """NamedShardings of the adapters: each axis named like its base weight's matching axis."""
    check_model_fits_mesh(cfg, mesh)
    boxed = jax.eval_shape(lambda: _init_lora(cfg, lora, jax.random.key(0)))
    return tree_shardings(nn.get_partition_spec(boxed), mesh, rules_for(cfg.num_key_value_heads, mesh))


def count(tree: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def delta(adapters_layer: Params, proj: Projection, lora: LoraConfig) -> jax.Array:
    """scale * A B in the base weight's layout (with a leading [layers] axis if the adapters have one)."""
    a, b = get(adapters_layer, proj.a), get(adapters_layer, proj.b)
    stacked = a.ndim == proj.n_in + 2
    fn = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1)) if stacked else (lambda a, b: jnp.tensordot(a, b, axes=1))
    return fn(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32) * lora.scale)


def merge(base: Params, adapters: Params, cfg: Phi3Config, lora: LoraConfig, dtype: str | None = None) -> Params:
    """A plain parameter tree: every targeted projection W + scale * A B (quantized bases expanded
    first), in `dtype` (default cfg.param_dtype). Layers stacked or not, as `base`."""
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    out = jax.tree.map(lambda x: x, base, is_leaf=quant.is_quantized)
    ad_trees = dict(_layer_trees(adapters)) if layers_stacked(adapters) == layers_stacked(base) else None
    if ad_trees is None:
        raise ValueError("merge: the base and the adapters must both have stacked layers or both per-layer")
    for key, layer in _layer_trees(out):
        offset = 1 if key == "layers" else 0
        for proj in projections(cfg):
            w = get(layer, proj.leaf)
            w = (quant.dequantize(w, proj.n_in - 1 + offset, jnp.float32) if quant.is_quantized(w)
                 else jnp.asarray(w, jnp.float32))
            if proj.target in lora.targets:
                w = w + delta(ad_trees[key], proj, lora)
            set_leaf(layer, proj.leaf, w.astype(dtype))
    return jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), out)


# ---------------------------------------------------------------------------- the frozen base
def quantize_leaf(w: Any, proj: Projection, lora: LoraConfig, stacked: bool) -> Any:
    """One base projection as LoRA stores it: quantized (host numpy) or cast to base_dtype."""
    if not lora.quantized:
        return jnp.asarray(w).astype(lora.base_dtype)
    return quant.quantize(np.asarray(w, np.float32), lora.base_dtype, proj.n_in - 1 + int(stacked))


def quantize_base(params: Params, cfg: Phi3Config, lora: LoraConfig) -> Params:
    """`params` with its projections stored as `lora.base_dtype` (embeddings and norms as they are).
    For models in memory (tests, small models); the loaders quantize one layer at a time instead."""
    out = jax.tree.map(lambda x: x, params)
    for key, layer in _layer_trees(out):
        for proj in projections(cfg):
            set_leaf(layer, proj.leaf, quantize_leaf(get(layer, proj.leaf), proj, lora, key == "layers"))
    return out


def base_logical_axes(cfg: Phi3Config, lora: LoraConfig) -> Params:
    """Logical axis names of the frozen base (stacked layers), quantized leaves included."""
    axes = param_logical_axes(cfg)
    if not lora.quantized:
        return axes
    for proj in projections(cfg):
        names = tuple(get(axes["layers"], proj.leaf))
        qnames = jax.sharding.PartitionSpec(*quant.quantized_names(names, proj.n_in))  # +1: the layers axis
        set_leaf(axes["layers"], proj.leaf, {lora.base_dtype: qnames, "scale": qnames})
    return axes


def abstract_base(cfg: Phi3Config, lora: LoraConfig) -> Params:
    """ShapeDtypeStructs of the frozen base (stacked layers), as `load_base` / `quantize_base` store it."""
    shapes = jax.tree.map(lambda x: x, abstract_params(cfg))
    for proj in projections(cfg):
        leaf = get(shapes["layers"], proj.leaf)
        if lora.quantized:
            value = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d)
                     in quant.quantized_shapes(leaf.shape, lora.base_dtype, proj.n_in).items()}
        else:
            value = jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(lora.base_dtype))
        set_leaf(shapes["layers"], proj.leaf, value)
    return shapes


def base_shardings(cfg: Phi3Config, lora: LoraConfig, mesh: Any) -> Params:
    """NamedShardings of the frozen base. A quantized leaf's block axis takes its weight's input-axis
    sharding where the mesh divides the number of blocks, and is replicated where it does not (a
    3072-wide embed axis has 48 blocks of 64: 16-way fsdp splits them, 256-way cannot)."""
    check_model_fits_mesh(cfg, mesh)
    shardings = tree_shardings(base_logical_axes(cfg, lora), mesh, rules_for(cfg.num_key_value_heads, mesh))

    def fit(sharding: Any, leaf: Any) -> Any:
        spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
        for i, axes in enumerate(spec):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if names and leaf.shape[i] % int(np.prod([mesh.shape[a] for a in names])):
                spec[i] = None
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(fit, shardings, abstract_base(cfg, lora))


def config_fields(lora: LoraConfig) -> dict[str, Any]:
    """LoRA settings as plain YAML-friendly values (a run's config.yaml `lora:` section)."""
    out = dataclasses.asdict(lora)
    out["targets"] = list(lora.targets)
    return out
