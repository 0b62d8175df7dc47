"""From one chip to a pod: the mesh, the logical-axis rules, and everything placed by them.

One mesh with four named axes, outermost first (the order decides which axes get the
fastest links: `tensor` varies fastest, so its devices are ICI neighbours; `data` varies
slowest, so it is the axis that crosses slices over DCN):

    data      pure data parallelism (parameters replicated)
    fsdp      data parallelism with parameters and optimiser state sharded (ZeRO-3)
    sequence  context parallelism: tokens of one sequence split across devices (ring attention);
              parameters are sharded over it too, as over fsdp
    tensor    tensor parallelism: whole attention heads and MLP columns

The model tags every parameter and activation with logical axis names; `LOGICAL_RULES` maps
them onto mesh axes. A new parallelism layout is a config change (`mesh.fsdp=4 mesh.tensor=2`),
never a code change.

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    state = sharded_init(cfg, mesh, optimizer, rng)         # born sharded, never whole
    step = make_train_step(cfg, mesh, optimizer)
    state, metrics = step(state, put_batch(batch, mesh))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from phi3jax.config import Phi3Config
from phi3jax.model import Params, Phi3, abstract_params, param_logical_axes

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). flax resolves them in order and
# never uses one mesh axis twice in the same array.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_embed", None),
    # parameters: ZeRO-3 over every data-like axis but `data`; tensor parallel over heads / mlp / vocab
    ("embed", ("fsdp", "sequence")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


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


# ------------------------------------------------------------------------------ rules
def logical_rules(cfg: Phi3Config, mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[tuple[str, Any], ...]:
    """LOGICAL_RULES for this model on this mesh, after checking that the mesh can shard it.

    GQA: kv heads are split over `tensor` when it divides them, and replicated otherwise (each
    tensor shard then holds every kv head: Phi-4-mini's 8 kv heads on tensor=16, say).
    """
    check_model_fits_mesh(cfg, mesh)
    tensor = mesh.shape.get("tensor", 1)
    if cfg.num_key_value_heads % tensor:
        return tuple((name, None if name in ("kv_heads", "act_kv_heads") else axes)
                     for name, axes in LOGICAL_RULES)
    return LOGICAL_RULES


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


def param_shardings(cfg: Phi3Config, mesh: Mesh) -> Params:
    """A NamedSharding for every parameter, from its logical axes and the rules."""
    return nn.logical_to_mesh_sharding(param_logical_axes(cfg), mesh, logical_rules(cfg, mesh))


def param_specs(cfg: Phi3Config, mesh: Mesh | jax.sharding.AbstractMesh) -> Params:
    """The PartitionSpec of every parameter (works on an AbstractMesh: no devices needed)."""
    return nn.logical_to_mesh(param_logical_axes(cfg), logical_rules(cfg, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh | jax.sharding.AbstractMesh) -> P:
    """[B, T] token arrays: batch over (data, fsdp), length over sequence."""
    return nn.logical_to_mesh_axes(("batch", "length"), LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


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


def state_shardings(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation) -> Any:
    """TrainState of shardings: parameters by the rules, optimiser moments like their parameters,
    scalars (step, counts) replicated."""
    from phi3jax.train.step import TrainState

    p_shard = param_shardings(cfg, mesh)
    abstract = jax.eval_shape(optimizer.init, abstract_params(cfg))
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract, p_shard,
                                      transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=p_shard, opt_state=opt_shard)


def abstract_state(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation) -> Any:
    """ShapeDtypeStructs (with shardings) of the whole train state: what AOT compilation lowers on,
    and the target of a restore onto `mesh`."""
    from phi3jax.train.step import init_train_state

    shapes = jax.eval_shape(lambda params: init_train_state(params, optimizer), abstract_params(cfg))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, state_shardings(cfg, mesh, optimizer))


# ------------------------------------------------------------------------------ running under a mesh
@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Iterator[Mesh]:
    """Make `mesh` and the logical rules current, so the model's activation constraints (and
    ring attention, when mesh.sequence > 1) take effect in what is traced inside."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def sharded_init(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                 rng: jax.Array | int = 0) -> Any:
    """A TrainState whose params and optimiser state are created directly in their sharded layout.

    One jit with out_shardings: XLA partitions the initialisers, so each device computes only
    its own shards (threefry is partitionable, so the values do not depend on the mesh).
    """
    from phi3jax.train.step import init_train_state

    if isinstance(rng, int):
        rng = jax.random.key(rng)

    def init(rng: jax.Array) -> Any:
        # Traced without a current mesh: the dummy forward pass of `init` is not sharded, only
        # what it returns is (out_shardings).
        boxed = Phi3(cfg).init(rng, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
        return init_train_state(nn.meta.unbox(boxed["params"]), optimizer)

    return jax.jit(init, out_shardings=state_shardings(cfg, mesh, optimizer))(rng)


def restore_opt_state(run_dir: str, step: int, cfg: Phi3Config, optimizer: optax.GradientTransformation,
                      mesh: Mesh) -> Any:
    """A checkpoint's optimiser state, each shard read straight onto its device of `mesh` (which
    need not be the mesh that saved it). Parameters: `train.checkpoint.restore_params(...,
    shardings=param_shardings(cfg, mesh))`."""
    import orbax.checkpoint as ocp

    from phi3jax.train import checkpoint as ckpt

    target = abstract_state(cfg, mesh, optimizer).opt_state
    with ckpt.checkpoint_manager(run_dir, async_save=False) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(opt_state=ocp.args.StandardRestore(target)))
    return restored["opt_state"]


def shard_params(params: Params, cfg: Phi3Config, mesh: Mesh) -> Params:
    """Place an existing (host or single-device) params tree onto the mesh per the rules."""
    return jax.device_put(params, param_shardings(cfg, mesh))


class MeshJit:
    """`jax.jit(fn)` traced under the model's logical rules and run under `mesh`, so activation
    constraints and ring attention (mesh.sequence > 1) take effect. Call it like `fn`; `lower`
    and `trace` take ShapeDtypeStructs too (AOT compilation for a topology that is not attached).
    Every call checks that the batch (`batch_arg`-th argument, a dict of [B, T]) fits the mesh."""

    def __init__(self, fn: Any, cfg: Phi3Config, mesh: Mesh, batch_arg: int = 1, **jit_kwargs: Any):
        self.cfg, self.mesh, self.batch_arg = cfg, mesh, batch_arg
        self.rules = logical_rules(cfg, mesh)
        rules = self.rules

        def traced(*args: Any) -> Any:
            with nn.logical_axis_rules(rules):
                return fn(*args)

        self._jitted = jax.jit(traced, **jit_kwargs)

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        args = list(args)
        batch = args[self.batch_arg] = dict(args[self.batch_arg])
        b, t = batch["inputs"].shape
        check_batch_fits_mesh(b, t, self.mesh)
        return tuple(args)

    def __call__(self, *args: Any) -> Any:
        args = self._args(args)
        with jax.set_mesh(self.mesh):
            return self._jitted(*args)

    def lower(self, *args: Any) -> Any:
        args = self._args(args)
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(*args)

    def trace(self, *args: Any) -> Any:
        """The traced function (its `.jaxpr` is the whole global program, before partitioning)."""
        args = self._args(args)
        with jax.set_mesh(self.mesh):
            return self._jitted.trace(*args)


def make_train_step(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                    accum_steps: int = 1, donate: bool = True, train_step: Any = None) -> MeshJit:
    """`phi3jax.train.step.train_step` (or a stand-in with its signature) over a mesh:
    `state, metrics = step(state, batch)`, with the state's and the batch's shardings fixed and the
    state donated (updated in place)."""
    if train_step is None:
        from phi3jax.train.step import train_step

    def step(state: Any, batch: dict[str, jax.Array]) -> Any:
        return train_step(state, batch, cfg=cfg, optimizer=optimizer, accum_steps=accum_steps)

    shardings = state_shardings(cfg, mesh, optimizer)
    return MeshJit(step, cfg, mesh,
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(cfg: Phi3Config, mesh: Mesh) -> MeshJit:
    """`phi3jax.train.step.loss_sums` over a mesh: `(nll_sum, count) = eval_step(params, batch)`."""
    from phi3jax.train.step import loss_sums

    return MeshJit(lambda params, batch: loss_sums(params, cfg, batch), cfg, mesh,
                   in_shardings=(param_shardings(cfg, mesh), batch_sharding(mesh)), out_shardings=replicated(mesh))


# ------------------------------------------------------------------------------ batches
def put_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global [B, T] host arrays (identical on every process) -> global arrays sharded over the mesh.

    Each process transfers only the blocks its own devices hold.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        arr = np.asarray(value)
        check_batch_fits_mesh(arr.shape[0], arr.shape[1], mesh)
        out[key] = jax.make_array_from_callback(arr.shape, sharding, lambda idx, arr=arr: arr[idx])
    return out


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """The rows of the global batch that this process's devices hold (what it should load)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size, mesh.shape["sequence"]))
    rows = sorted({r for idx in indices.values() for r in range(*idx[0].indices(global_batch_size))})
    return np.asarray(rows, dtype=np.int64)


def put_process_batch(local: Mapping[str, Any], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
    """Rows `process_batch_rows(mesh, B)` loaded by this process -> global [B, T] arrays.

    Per-process data loading: no process ever reads or holds the rows of another.
    """
    rows = process_batch_rows(mesh, global_batch_size)
    position = {int(r): i for i, r in enumerate(rows)}
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local.items():
        arr = np.asarray(value)
        if arr.shape[0] != len(rows):
            raise MeshError(f"batch[{key!r}] has {arr.shape[0]} rows, but this process holds {len(rows)} rows "
                            f"of the global batch of {global_batch_size}")
        shape = (global_batch_size, *arr.shape[1:])
        check_batch_fits_mesh(shape[0], shape[1], mesh)

        def block(idx: tuple[slice, ...], arr: np.ndarray = arr) -> np.ndarray:
            local_rows = [position[r] for r in range(*idx[0].indices(global_batch_size))]
            return arr[local_rows][(slice(None), *idx[1:])]

        out[key] = jax.make_array_from_callback(shape, sharding, block)
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


# ------------------------------------------------------------------------------ multi-host
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run. All None: single process, or a TPU VM pod
    slice / cloud cluster that JAX detects by itself."""

    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DistributedConfig:
        values = dict(values or {})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown distributed setting {sorted(unknown)[0]!r}; use coordinator, "
                             "num_processes, process_id")
        return cls(**values)

    def validate(self) -> None:
        given = [self.coordinator is not None, self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise ValueError("distributed: give all of coordinator=HOST:PORT, num_processes=N and process_id=I "
                             "(or none of them on a TPU VM, where JAX finds its peers itself)")
        if self.coordinator is None:
            return
        if not re.fullmatch(r"[^\s:]+:\d+", str(self.coordinator)):
            raise ValueError(f"distributed.coordinator={self.coordinator!r}: expected HOST:PORT of process 0, "
                             "e.g. 10.0.0.2:1234")
        if not isinstance(self.num_processes, int) or self.num_processes < 1:
            raise ValueError(f"distributed.num_processes={self.num_processes!r}: expected a positive int")
        if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"distributed.process_id={self.process_id!r}: expected an int in "
                             f"[0, {self.num_processes})")


def _on_multihost_tpu_vm() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


_distributed_ready = False


def initialize_distributed(dist: DistributedConfig | Mapping[str, Any] | None = None) -> bool:
    """Join the multi-process run described by `dist`; call before anything touches a device.

    Explicit coordinator: `jax.distributed.initialize(coordinator, num_processes, process_id)`
    (on CPU with the gloo collectives). Nothing given on a multi-host TPU VM: JAX's own
    detection. Otherwise a single-process run, and nothing to do. Returns True if initialised.
    """
    global _distributed_ready
    if not isinstance(dist, DistributedConfig):
        dist = DistributedConfig.from_dict(dist)
    dist.validate()
    if _distributed_ready:
        return True
    if dist.coordinator is not None:
        if dist.num_processes == 1:
            return False
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=dist.coordinator, num_processes=dist.num_processes,
                                   process_id=dist.process_id)
    elif _on_multihost_tpu_vm():
        jax.distributed.initialize()
    else:
        return False
    _distributed_ready = True
    return True


def is_main_process() -> bool:
    """True on process 0: the one that logs, prints and writes side files."""
    return jax.process_index() == 0
