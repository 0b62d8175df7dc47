"""The device mesh: sizes from config, built over the devices, checked against the model and batch.

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))      # (data, fsdp, sequence, tensor)
    check_model_fits_mesh(cfg, mesh)                    # a clear error naming the axis and the fix

Across TPU slices the outer axes go over DCN (a hybrid mesh). The axis names and the rules that
map logical names onto them are in `phi3jax.parallel.axes`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from phi3jax.config import Phi3Config
from phi3jax.parallel.axes import BATCH, LENGTH, MESH_AXES, spec


class MeshError(ValueError):
    """A mesh that cannot be built on these devices or cannot shard this model."""


# ------------------------------------------------------------------------------ mesh config
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. -1 (at most one axis) takes the remaining devices.

    data/fsdp/sequence/tensor are sizes within one slice (ICI). Across TPU slices (DCN)
    the mesh is multiplied by dcn_data x dcn_fsdp; dcn_data=-1 means "the number of slices"
    (1 on a single slice, on GPUs and on CPUs).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    dcn_data: int = -1
    dcn_fsdp: int = 1

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
                raise MeshError(f"mesh.{field.name}={value!r}: an axis size must be a positive int or -1 "
                                "(the remaining devices)")
        ici = [n for n in ("data", "fsdp", "sequence", "tensor") if getattr(self, n) == -1]
        if len(ici) > 1:
            raise MeshError(f"mesh: only one axis may be -1, got {' and '.join(ici)}")
        if self.dcn_fsdp == -1:
            raise MeshError("mesh.dcn_fsdp=-1 is not supported; only dcn_data may take the remaining slices")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> MeshConfig:
        values = dict(values or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MeshError(f"unknown mesh axis {sorted(unknown)[0]!r}; the mesh axes are "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: _as_int(k, v) for k, v in values.items()})

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """'fsdp=16,tensor=4' (the `phi3jax plan --mesh` form); unnamed axes keep their defaults."""
        values: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep:
                raise MeshError(f"--mesh {text!r}: expected AXIS=SIZE items separated by commas, "
                                f"e.g. fsdp=16,tensor=4; got {item!r}")
            values[name.strip()] = value.strip()
        return cls.from_dict(values)

    def resolve(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
        """The concrete size of every mesh axis (dcn and ici folded together), validated."""
        if num_slices < 1 or num_devices % num_slices:
            raise MeshError(f"{num_devices} devices cannot form {num_slices} equal slices")
        dcn_data = self.dcn_data
        if dcn_data == -1:
            if num_slices % self.dcn_fsdp:
                raise MeshError(f"mesh.dcn_fsdp={self.dcn_fsdp} does not divide the {num_slices} slices")
            dcn_data = num_slices // self.dcn_fsdp
        if dcn_data * self.dcn_fsdp != num_slices:
            raise MeshError(f"mesh.dcn_data={dcn_data} x mesh.dcn_fsdp={self.dcn_fsdp} = "
                            f"{dcn_data * self.dcn_fsdp}, but the devices form {num_slices} slice(s)")
        per_slice = num_devices // num_slices
        ici = {n: getattr(self, n) for n in ("data", "fsdp", "sequence", "tensor")}
        known = math.prod(v for v in ici.values() if v != -1)
        free = [n for n, v in ici.items() if v == -1]
        where = f"{per_slice} devices" + (f" per slice ({num_slices} slices)" if num_slices > 1 else "")
        if free:
            if per_slice % known:
                raise MeshError(f"mesh {self._describe(ici)}: the fixed axes multiply to {known}, which does "
                                f"not divide the {where}; mesh.{free[0]}=-1 cannot take the rest")
            ici[free[0]] = per_slice // known
        elif known != per_slice:
            raise MeshError(f"mesh {self._describe(ici)} = {known} devices, but there are {where}. Make the "
                            f"product {per_slice}, or set one axis to -1 to take the remaining devices")
        return {"data": dcn_data * ici["data"], "fsdp": self.dcn_fsdp * ici["fsdp"],
                "sequence": ici["sequence"], "tensor": ici["tensor"]}

    @staticmethod
    def _describe(ici: Mapping[str, int]) -> str:
        return " x ".join(f"{n}={v}" for n, v in ici.items())


def _as_int(name: str, value: Any) -> int:
    try:
        if isinstance(value, str):
            value = int(value.strip())
        if isinstance(value, float) and value.is_integer():
            value = int(value)
    except ValueError:
        raise MeshError(f"mesh.{name}={value!r} is not an integer") from None
    return value


# ------------------------------------------------------------------------------ the mesh
def num_slices_of(devices: Sequence[Any]) -> int:
    """TPU slices spanned by `devices` (1 where devices carry no slice_index)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg: MeshConfig | Mapping[str, Any] | None = None, devices: Sequence[Any] | None = None
              ) -> Mesh:
    """The (data, fsdp, sequence, tensor) mesh over `devices` (default: all devices of all processes).

    On TPU the device order follows the physical torus (mesh_utils), and across slices the
    outer axes go over DCN (a hybrid mesh); elsewhere devices are taken in process, id order.
    """
    if not isinstance(mesh_cfg, MeshConfig):
        mesh_cfg = MeshConfig.from_dict(mesh_cfg)
    devices = list(jax.devices() if devices is None else devices)
    slices = num_slices_of(devices)
    sizes = mesh_cfg.resolve(len(devices), slices)
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        if slices > 1:
            dcn = (*_dcn(mesh_cfg, slices), 1, 1)
            ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
            array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
        else:
            array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        array = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(shape)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _dcn(mesh_cfg: MeshConfig, slices: int) -> tuple[int, int]:
    dcn_data = slices // mesh_cfg.dcn_fsdp if mesh_cfg.dcn_data == -1 else mesh_cfg.dcn_data
    return dcn_data, mesh_cfg.dcn_fsdp


def describe_mesh(mesh: Mesh | jax.sharding.AbstractMesh) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())


def check_model_fits_mesh(cfg: Phi3Config, mesh: Mesh | jax.sharding.AbstractMesh) -> None:
    """Raise MeshError naming the axis and the fix if the mesh cannot shard this model evenly."""
    shape = mesh.shape
    tensor = shape.get("tensor", 1)
    zero3 = shape.get("fsdp", 1) * shape.get("sequence", 1)

    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)

    for what, size in (("num_attention_heads", cfg.num_attention_heads),
                       ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size)):
        if size % tensor:
            raise MeshError(f"mesh.tensor={tensor} does not divide {what}={size}: tensor parallelism shards "
                            f"whole heads, MLP columns and vocabulary rows. Use a tensor size that divides it "
                            f"(for {what}: {divisors(size)})")
    if cfg.hidden_size % zero3:
        raise MeshError(f"mesh.fsdp x mesh.sequence = {zero3} does not divide hidden_size={cfg.hidden_size}, "
                        "the dimension parameters are sharded along; choose fsdp x sequence among "
                        f"{divisors(cfg.hidden_size)}")


# ------------------------------------------------------------------------------ batches
def check_batch_fits_mesh(batch_size: int, seq_len: int, mesh: Mesh | jax.sharding.AbstractMesh) -> None:
    shape = mesh.shape
    rows = shape.get("data", 1) * shape.get("fsdp", 1)
    if batch_size % rows:
        raise MeshError(f"global batch size {batch_size} is not divisible by mesh.data x mesh.fsdp = {rows}; "
                        f"every data shard needs whole sequences (use a multiple of {rows})")
    seq = shape.get("sequence", 1)
    if seq_len % seq:
        raise MeshError(f"sequence length {seq_len} is not divisible by mesh.sequence = {seq}; ring attention "
                        f"splits each sequence into equal blocks (use a multiple of {seq})")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] token arrays: batch over (data, fsdp), length over sequence (LOGICAL_RULES)."""
    return NamedSharding(mesh, spec((BATCH, LENGTH)))


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """The rows of the global batch that this process's devices hold (what it should load)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size, mesh.shape["sequence"]))
    rows = sorted({r for idx in indices.values() for r in range(*idx[0].indices(global_batch_size))})
    return np.asarray(rows, dtype=np.int64)


def put_batch(local: Mapping[str, Any], mesh: Mesh, global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """This process's rows of a batch (`process_batch_rows`; all of them in a single process) -> global
    [B, T] arrays sharded over the mesh. No process reads or holds the rows of another."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local.items():
        arr = np.asarray(value)
        rows = global_batch_size or arr.shape[0] * jax.process_count()
        check_batch_fits_mesh(rows, arr.shape[1], mesh)
        out[key] = jax.make_array_from_process_local_data(sharding, arr, (rows, *arr.shape[1:]))
    return out


# ------------------------------------------------------------------------------ accounting
def device_bytes(tree: Any, device: Any = None) -> int:
    """Bytes of `tree`'s arrays that live on `device` (default: this process's first device)."""
    device = device or jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total


def sharded_bytes_per_device(tree: Any) -> int:
    """Largest per-device share of a tree of arrays or ShapeDtypeStructs carrying shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * jnp.dtype(leaf.dtype).itemsize
    return total


