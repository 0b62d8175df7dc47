"""shard_map wrappers: run the kernels per device under a Mesh, split over batch and heads.

A pallas_call is opaque to GSPMD (it cannot partition it), so under a mesh the kernels run
inside `shard_map`: each device gets its rows (batch axes, e.g. data and fsdp) and its
heads (head axes, e.g. tensor) and runs the kernel on those alone. Attention needs no
communication across batch rows or heads, so nothing is gathered. The sequence axis is
left whole here (sequence parallelism is ring attention's job).

Heads: query heads h and kv heads h // G are split into the same number of contiguous
shards, so every shard holds whole GQA groups. When the kv heads do not divide by the
head shards but a repeat makes them (e.g. 2 kv heads on a 4-way tensor axis), K and V are
repeated just enough; otherwise the heads stay unsplit on that axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels.ops import decode_attention, flash_attention


def _axes(mesh, names: str | Sequence[str] | None, size: int) -> tuple[str, ...]:
    """The named mesh axes (present, non-trivial) whose product divides `size`."""
    if names is None:
        return ()
    names = (names,) if isinstance(names, str) else tuple(names)
    shape = dict(mesh.shape)
    picked: list[str] = []
    for name in names:
        if name in shape and shape[name] > 1 and size % (math.prod(shape[a] for a in picked) * shape[name]) == 0:
            picked.append(name)
    return tuple(picked)


def _spec(*dims) -> PartitionSpec:
    return PartitionSpec(*((d if len(d) != 1 else d[0]) if isinstance(d, tuple) and d else None for d in dims))


def _head_plan(mesh, head_axes, heads: int, kv_heads: int) -> tuple[tuple[str, ...], int]:
    """(mesh axes the heads split over, kv repeat factor)."""
    axes = _axes(mesh, head_axes, heads)
    shards = math.prod(dict(mesh.shape)[a] for a in axes)
    if shards == 1:
        return (), 1
    repeat = shards // math.gcd(kv_heads, shards)
    if (heads // kv_heads) % repeat:
        return (), 1
    return axes, repeat


def sharded_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh | jax.sharding.AbstractMesh,
                            batch_axes: str | Sequence[str] | None = ("data", "fsdp"),
                            head_axes: str | Sequence[str] | None = ("tensor",),
                            q_offset: jax.Array | None = None, q_segment_ids: jax.Array | None = None,
                            kv_segment_ids: jax.Array | None = None, attention_fn=None, **kwargs) -> jax.Array:
    """`flash_attention` (or `attention_fn`, same signature) under `mesh`, split over batch and heads.

    batch_axes / head_axes name the mesh axes the batch and head dimensions are sharded
    over (axes missing from the mesh, of size 1, or that do not divide are skipped).
    Other keyword arguments go to the kernel. Differentiable like the kernel.
    """
    fn = attention_fn or flash_attention
    b, _, h, _ = q.shape
    kv = k.shape[2]
    b_axes = _axes(mesh, batch_axes, b)
    h_axes, repeat = _head_plan(mesh, head_axes, h, kv)
    if repeat > 1:
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    if not b_axes and not h_axes:
        return fn(q, k, v, q_offset=q_offset, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, **kwargs)
    if q_segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    qkv_spec = _spec(b_axes, (), h_axes, ())
    row_spec = _spec(b_axes, ())
    offset = q_offset if q_offset is None else jnp.asarray(q_offset, jnp.int32)

    def local(q, k, v, offset, q_seg, kv_seg):
        return fn(q, k, v, q_offset=offset, q_segment_ids=q_seg, kv_segment_ids=kv_seg, **kwargs)

    in_specs = (qkv_spec, qkv_spec, qkv_spec, None if offset is None else _spec(b_axes),
                None if q_segment_ids is None else row_spec, None if kv_segment_ids is None else row_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(
        q, k, v, offset, q_segment_ids, kv_segment_ids)


def sharded_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                             mesh: Mesh | jax.sharding.AbstractMesh,
                             batch_axes: str | Sequence[str] | None = ("data", "fsdp"),
                             head_axes: str | Sequence[str] | None = ("tensor",), **kwargs) -> jax.Array:
    """`decode_attention` under `mesh`: q [B,H,D], caches [B,KV,S,D] split over batch and heads."""
    b, h, _ = q.shape
    kv = k_cache.shape[1]
    b_axes = _axes(mesh, batch_axes, b)
    h_axes, repeat = _head_plan(mesh, head_axes, h, kv)
    if repeat > 1:  # rare (kv heads fewer than head shards); costs a cache copy, so say so in docs
        k_cache, v_cache = jnp.repeat(k_cache, repeat, axis=1), jnp.repeat(v_cache, repeat, axis=1)
    if not b_axes and not h_axes:
        return decode_attention(q, k_cache, v_cache, lengths, **kwargs)
    q_spec, cache_spec = _spec(b_axes, h_axes, ()), _spec(b_axes, h_axes, (), ())

    def local(q, k, v, lengths):
        return decode_attention(q, k, v, lengths, **kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, cache_spec, cache_spec, _spec(b_axes)),
                         out_specs=q_spec, check_vma=False)(q, k_cache, v_cache, jnp.asarray(lengths, jnp.int32))
