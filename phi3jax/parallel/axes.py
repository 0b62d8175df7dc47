"""Logical axis names and the rules that map them onto the mesh: data, not code.

The model names every parameter dimension and every large activation dimension with one of
the logical names below; `LOGICAL_RULES` says which mesh axis (or axes, or none) each name is
sharded over. A new parallelism layout is a change of mesh sizes (`mesh.fsdp=4 mesh.tensor=2`),
never a change of code.

Mesh axes, outermost first (the order decides which axes get the fastest links: `tensor` varies
fastest, so its devices are ICI neighbours; `data` varies slowest, so it is the axis that crosses
slices over DCN):

    data      pure data parallelism (parameters replicated)
    fsdp      data parallelism with parameters and optimiser state sharded (ZeRO-3)
    sequence  context parallelism: tokens of one sequence split across devices (ring attention);
              parameters are sharded over it too, as over fsdp
    tensor    tensor parallelism: whole attention heads and MLP columns
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical names of activations. Parameters use EMBED/HEADS/KV_HEADS/HEAD_DIM/MLP/VOCAB/LAYERS/
# NORM; activations get names of their own so a rule can shard a weight's `embed` dimension
# (FSDP) without sharding the activations' hidden dimension.
BATCH, LENGTH = "batch", "length"
ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")
EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS, NORM = (
    "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", "norm")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical name -> mesh axis (or axes, or None = replicated). flax resolves them in order and
# never uses one mesh axis twice in the same array.
LOGICAL_RULES: Rules = (
    # activations
    (BATCH, ("data", "fsdp")),
    (LENGTH, "sequence"),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (ACT_EMBED, None),
    # parameters: ZeRO-3 over every data-like axis but `data`; tensor parallel over heads / mlp / vocab
    (EMBED, ("fsdp", "sequence")),
    (VOCAB, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (MLP, "tensor"),
    (HEAD_DIM, None),
    (LAYERS, None),
    (NORM, None),
)


def rules_for(num_key_value_heads: int, mesh: Any) -> Rules:
    """LOGICAL_RULES for a model with this many kv heads on `mesh` (a Mesh or AbstractMesh).

    GQA: kv heads are split over `tensor` when it divides them, and replicated otherwise (each
    tensor shard then holds every kv head: Phi-4-mini's 8 kv heads on tensor=16, say).
    """
    if num_key_value_heads % dict(mesh.shape).get("tensor", 1):
        return tuple((name, None if name in (KV_HEADS, ACT_KV_HEADS) else axes) for name, axes in LOGICAL_RULES)
    return LOGICAL_RULES


def spec(names: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> P:
    """The PartitionSpec of an array whose dimensions carry these logical names."""
    return nn.logical_to_mesh_axes(tuple(names), rules)


def mesh_axes(name: str, rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes one logical name maps to (empty when replicated)."""
    axes = spec((name,), rules)[0]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Any, rules: Rules) -> jax.Array:
    """`x` constrained to the layout its logical names give on `mesh`; unchanged without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, rules)))


def tree_shardings(logical_tree: Any, mesh: Any, rules: Rules) -> Any:
    """A NamedSharding for every leaf of a tree of logical PartitionSpecs."""
    return jax.tree.map(lambda names: NamedSharding(mesh, spec(tuple(names), rules)), logical_tree,
                        is_leaf=lambda x: isinstance(x, P))
