"""`phi3jax plan`: compile the real train step for a TPU topology before renting it.

libtpu (from pip) can run the TPU compiler on a machine without TPUs: jax's
`get_topology_desc` describes, say, a v5e 16x16 pod as compile-only devices, the sharded
train step is lowered on abstract shapes (no weights are ever created) and compiled for it.
What the compiler reports is what the pod would do:

  * per-device memory from the compile's buffer assignment (arguments, outputs, temporaries),
    with parameters, optimiser state and batch broken out from their shardings;
  * whether that fits the HBM a program may use on the chip: the chip's HBM less what the TPU
    runtime reserves (15.75 of 16 GiB on v5e), as the compiler reports it; a step that does not
    fit at all fails to compile, and the report then carries the compiler's own numbers;
  * the step's FLOPs from the compile's cost analysis, and the time they take at peak.

With LoRA (`lora.*` keys, on the command line or in the YAML's `lora:` section) the step is the
LoRA step: the frozen base (per dtype: quantized projections, the rest), the adapters and their
optimiser state are broken out. With `objective=dpo` (and `dpo.*` keys, or the YAML's) the step is
the preference step, and the reference's own weights are reported: a frozen copy of what is
trained, or nothing for `precomputed` (a log-probability per sequence in the batch) and
`adapter_off` (the LoRA base itself).

GPU targets (h100:N) are estimated from the CPU compiler on N host devices and labelled as such.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from phi3jax.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES

GiB = 2**30


class PlanError(ValueError):
    """A plan request that cannot be carried out (unknown target, bad mesh, bad config)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    dims: int  # 2 for the 2-D tori (v5e, v6e), 3 for v4 / v5p
    topology_prefix: str  # what libtpu's topology names start with
    chip_config: str  # 'megacore': one JAX device per chip (two TensorCores fused)
    cores_per_chip_in_name: int  # 'v5p-8' counts TensorCores, 'v5e-8' counts chips
    usable_hbm_bytes: int | None = None  # what a program may use, when the compiler cannot be asked


# usable_hbm_bytes: the HBM the TPU compiler lets one program use per chip ("available HBM" in its
# out-of-memory error), as libtpu 0.0.x with jax 0.12 reports it for each generation, to the 0.01 GiB
# it prints. `usable_hbm` asks the compiler itself; these numbers stand in where that fails.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 3, "v4", "megacore", 2, int(30.75 * GiB)),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 2, "v5e", "default", 1, int(15.75 * GiB)),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 3, "v5p", "megacore", 2, int(95.73 * GiB)),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 2, "v6e", "default", 1, int(31.24 * GiB)),
}
GPUS: dict[str, Chip] = {
    "h100": Chip("NVIDIA H100 80GB", 80 * 10**9, 989e12, 0, "", "", 1),
}
# Slice shapes by chip count (as Cloud TPU builds them), for names like v5e-256 / v5p-128.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Target:
    chip: Chip
    shape: tuple[int, ...]  # chips per dimension; (N,) for GPUs
    num_slices: int = 1
    platform: str = "tpu"

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        if self.platform != "tpu":
            return f"{self.shape[0]} x {self.chip.name}"
        shape = "x".join(map(str, self.shape))
        if self.num_slices > 1:
            return f"{self.num_slices} x {self.chip.name} {shape} slices over DCN ({self.chips} chips)"
        return f"{self.chip.name} {shape} ({self.chips} chips)"


def _known_targets() -> str:
    return ("v4, v5e, v5p, v6e as CHIP:TOPOLOGY (v5e:16x16, v6e:4x8, v4:2x2x2, v5p:4x4x4) or as the Cloud TPU "
            "name (v5e-256, v5p-128), or h100:N for a GPU estimate")


def parse_target(text: str, num_slices: int = 1) -> Target:
    """'v5e:16x16', 'v5p:4x4x4', 'v5e-256', 'v5p-128' or 'h100:8'."""
    raw = text.strip().lower()
    if num_slices < 1:
        raise PlanError(f"--num-slices {num_slices}: must be at least 1")
    m = re.fullmatch(r"(h100):(\d+)", raw)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise PlanError(f"--target {text!r}: need at least one GPU")
        return Target(GPUS[m.group(1)], (n,), 1, platform="gpu")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)[:=](\d+(?:x\d+)*)", raw)
    if m:
        chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
        shape = tuple(int(d) for d in m.group(2).split("x"))
        if len(shape) == 2 and chip.dims == 3:
            shape = (*shape, 1)
        if len(shape) != chip.dims or min(shape) < 1:
            raise PlanError(f"--target {text!r}: a {chip.name} topology has {chip.dims} dimensions, "
                            f"e.g. {'v5e:16x16' if chip.dims == 2 else 'v5p:4x4x4'}")
        return Target(chip, shape, num_slices)
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", raw)
    if m:
        chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
        count = int(m.group(2))
        chips = count // chip.cores_per_chip_in_name
        table = _SHAPES_2D if chip.dims == 2 else _SHAPES_3D
        if count % chip.cores_per_chip_in_name or chips not in table:
            raise PlanError(f"--target {text!r}: no {chip.name} slice of that size; known sizes: "
                            f"{', '.join(f'{m.group(1)}-{c * chip.cores_per_chip_in_name}' for c in table)}")
        return Target(chip, table[chips], num_slices)
    raise PlanError(f"--target {text!r} is not a known topology; use {_known_targets()}")


def _attached_gpus() -> list[Any]:
    import jax

    try:
        return list(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend in this process
        return []


def topology_devices(target: Target) -> list[Any]:
    """Compile-only devices of a TPU topology (libtpu, no hardware), or host CPU devices for GPU estimates."""
    import jax

    if target.platform != "tpu":
        gpus = _attached_gpus()
        if len(gpus) >= target.chips:  # the real thing is attached: compile for it, no estimate
            return gpus[: target.chips]
        devices = jax.devices("cpu")
        if len(devices) < target.chips:
            raise PlanError(f"the GPU estimate for {target.chips} GPUs compiles on {target.chips} host devices, but "
                            f"this process has {len(devices)}; run it as a fresh process, or set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={target.chips}")
        return devices[: target.chips]
    from pallas_kernels.aot import libtpu_available, tpu_topology  # lets several processes load libtpu at once

    if not libtpu_available():
        raise PlanError("phi3jax plan compiles for TPUs with libtpu, the TPU compiler (no TPU needed), which is "
                        "not installed: install phi3jax's `tpu` or `dev` extra (pip install -e '.[dev]' in a "
                        "checkout), or libtpu itself (pip install libtpu)")

    shape3 = (*target.shape, 1)[:3]
    host_bounds = tuple(min(s, 2) for s in shape3) if target.chip.dims == 3 else (
        (min(shape3[0], 2), min(shape3[1], 2), 1))
    if target.chip.dims == 2:
        wrap = (shape3[0] == 16, shape3[1] == 16, False)
    else:
        wrap = (all(s % 4 == 0 for s in shape3),) * 3
    try:
        topo = tpu_topology(target.topology_name, chip_config_name=target.chip.chip_config,
                            chips_per_host_bounds=host_bounds, num_slices=target.num_slices, wrap=wrap)
    except Exception as e:  # libtpu missing, or a topology it rejects
        raise PlanError(f"cannot describe the TPU topology {target.topology_name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}). The TPU compiler comes with `pip install libtpu`.") from e
    return list(topo.devices)


_AVAILABLE_HBM = re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)|of ([\d.]+)([KMGT]?) hbm")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def reported_hbm_bytes(message: str) -> int | None:
    """The usable HBM a TPU compiler out-of-memory message states, in bytes (to its 0.01 precision):
    "... exceeds available HBM (15.75G)", or "Used 16.50G of 15.75G hbm" from older libtpu. None if none."""
    m = _AVAILABLE_HBM.search(message)
    if m is None:
        return None
    number, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(float(number) * _UNITS[unit])


def usable_hbm(target: Target, device: Any) -> tuple[int, str]:
    """The HBM one program may use on each chip of `target`, and where that number comes from.

    On TPU: the chip's HBM less what the runtime reserves. libtpu states it only when a program does
    not fit, so this compiles one that cannot (a 1 TiB array, in a fraction of a second) and reads the
    number off the error; failing that, the chip's entry in CHIPS. GPUs: the card's memory.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    chip = target.chip
    if target.platform != "tpu":
        return chip.hbm_bytes, "the GPU's memory"
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("chip",)),
                                          jax.sharding.PartitionSpec())
    try:
        jax.jit(lambda: jnp.zeros((2**40,), jnp.int8), out_shardings=sharding).lower().compile()
    except Exception as e:  # expected: the compiler's out-of-memory error, which names the usable HBM
        reported = reported_hbm_bytes(str(e))
        if reported:
            return reported, "as the TPU compiler reports it"
    if chip.usable_hbm_bytes is None:
        return chip.hbm_bytes, "the chip's HBM"
    return chip.usable_hbm_bytes, f"libtpu's figure for the {chip.name} (phi3jax.cli.plan.CHIPS)"


def fits_hbm(peak_bytes: int, usable_bytes: int) -> bool:
    """A step fits when its compiled peak is within the HBM a program may use (not the chip's whole HBM)."""
    return peak_bytes <= usable_bytes


# ------------------------------------------------------------------------------ config
@dataclasses.dataclass
class PlanInputs:
    cfg: Any  # Phi3Config
    name: str
    mesh: dict[str, Any]
    optim: dict[str, Any]
    batch: int | None = None
    seq: int | None = None
    lora: Any = None  # LoraConfig: plan the LoRA step
    dpo: Any = None  # DpoConfig: plan the preference (DPO) step


def plan_inputs(spec: str) -> PlanInputs:
    """--config: a preset name, a train.py YAML (its model, mesh, optim, batch_size, seq_len) or an HF config."""
    from phi3jax.config import PRESETS, Phi3Config

    if spec in PRESETS:
        return PlanInputs(Phi3Config.preset(spec), spec, {}, {})
    if os.path.isdir(spec) or spec.endswith(".json"):
        return PlanInputs(Phi3Config.from_hf(spec), os.path.basename(os.path.normpath(spec)), {}, {})
    if not os.path.isfile(spec):
        raise PlanError(f"--config {spec!r}: not a preset ({', '.join(sorted(PRESETS))}), nor a YAML file, "
                        "nor a Hugging Face config.json / model directory")
    from phi3jax.train.config import build_model_config, load_config, model_section

    train = load_config(spec)  # train.py's own config: model, mesh, optim, batch_size, seq_len
    preset, fields = model_section(train)
    return PlanInputs(build_model_config(preset, fields), preset or train.name, dataclasses.asdict(train.mesh),
                      dataclasses.asdict(train.optim), train.batch_size, train.seq_len, train.lora,
                      train.dpo if train.objective == "dpo" else None)


def dpo_overrides(base: Any, items: list[str]) -> Any:
    """A DpoConfig from `base` with `objective=dpo` / `dpo.KEY=VALUE` items applied; None for the
    language-model step (`objective=lm`, or neither a base nor an item)."""
    from phi3jax.train.config import _parse_value
    from phi3jax.train.dpo import DpoConfig

    fields = dataclasses.asdict(base) if base is not None else {}
    wanted = base is not None
    names = {f.name for f in dataclasses.fields(DpoConfig)}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if sep and key == "objective" and raw.strip() in ("lm", "dpo"):
            wanted = raw.strip() == "dpo"
            continue
        if not sep or not key.startswith("dpo.") or key.removeprefix("dpo.") not in names:
            raise PlanError(f"{item!r}: plan takes objective=lm|dpo and dpo.KEY=VALUE, KEY one of {sorted(names)}")
        fields[key.removeprefix("dpo.")] = _parse_value(raw)
        wanted = True
    if not wanted:
        return None
    try:
        return DpoConfig(**fields)
    except ValueError as e:
        raise PlanError(str(e)) from None


def lora_overrides(base: Any, items: list[str]) -> Any:
    """A LoraConfig from `base` (or the defaults) with `lora.KEY=VALUE` items applied; None without either."""
    from phi3jax.config import ConfigError, LoraConfig
    from phi3jax.train.config import _parse_value

    fields = dataclasses.asdict(base) if base is not None else {}
    for item in items:
        key, sep, raw = item.partition("=")
        name = key.strip().removeprefix("lora.")
        if not sep or not key.startswith("lora.") or name not in {f.name for f in dataclasses.fields(LoraConfig)}:
            raise PlanError(f"{item!r}: plan takes LoRA settings as lora.KEY=VALUE, KEY one of "
                            f"{[f.name for f in dataclasses.fields(LoraConfig)]}")
        fields[name] = _parse_value(raw)
    if base is None and not items:
        return None
    try:
        return LoraConfig(**fields)
    except ConfigError as e:
        raise PlanError(str(e)) from None


# ------------------------------------------------------------------------------ FLOPs
def matmul_flops(jaxpr: Any) -> float:
    """FLOPs of every matmul in a (closed) jaxpr, over the whole global program.

    Scanned bodies count `length` times (XLA's cost analysis counts a loop body once, which
    undercounts a layer scan by the number of layers), shard_map bodies once per device of
    their manual axes, a cond its most expensive branch, a Pallas kernel its own cost estimate,
    remat recomputation where it occurs.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(matmul_flops(b) for b in eqn.params["branches"])
        elif name == "pallas_call":  # a kernel: its own estimate (live tiles only), else body x grid
            estimate = getattr(eqn.params.get("cost_estimate"), "flops", None)
            grid = getattr(eqn.params.get("grid_mapping"), "grid", ())
            total += estimate if estimate else math.prod(grid) * matmul_flops(eqn.params["jaxpr"])
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            copies = math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
            total += copies * matmul_flops(eqn.params["jaxpr"])
        else:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        total += matmul_flops(sub)
    return total


# ------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Plan:
    model: str
    num_params: int
    target: str
    platform: str
    estimate_note: str | None
    devices: int
    mesh: dict[str, int]
    batch: int
    seq: int
    accum_steps: int
    dtype: str
    param_dtype: str
    remat_policy: str
    attention: str  # the attention implementation the target gets (attention_impl resolved for it)
    compile_seconds: float
    fits: bool
    hbm_bytes: int
    # per-device bytes
    params_bytes: int  # what is trained: the parameters, or with LoRA the adapters
    opt_state_bytes: int
    batch_bytes: int
    lora: str | None = None  # the LoRA settings planned, if any
    dpo: str | None = None  # the preference-tuning settings planned, if any
    reference_bytes: int | None = None  # DPO: the reference's own weights (0: precomputed, adapter_off, SimPO)
    frozen_projection_bytes: int | None = None  # LoRA: the frozen projections as stored (quantized for QLoRA)
    frozen_other_bytes: int | None = None  # LoRA: the rest of the frozen base (embeddings, norms)
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    peak_bytes: int | None = None
    usable_hbm_bytes: int | None = None  # what a program may use per chip: hbm_bytes less the runtime's reserve
    usable_hbm_source: str | None = None  # where usable_hbm_bytes comes from
    compiler_message: str | None = None
    flops_total: float | None = None  # every matmul of the traced step, layers x their count
    flops_per_device: float | None = None  # flops_total / devices
    compiler_flops_per_device: float | None = None  # XLA cost analysis: loop bodies counted once
    peak_flops: float | None = None
    seconds_at_peak: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_plan(inputs: PlanInputs, target: Target, mesh_override: Mapping[str, Any] | None = None,
              batch: int | None = None, seq: int | None = None, accum_steps: int | None = None,
              overrides: Mapping[str, Any] | None = None, lora: Any = None, dpo: Any = None) -> Plan:
    """Compile the train step for `target` on abstract shapes and read memory and FLOPs off the compile
    (the LoRA step with `lora`, the preference step with `dpo`; default: the inputs' own settings)."""
    import jax
    import jax.numpy as jnp

    from phi3jax import lora as lora_lib
    from phi3jax import parallel
    from phi3jax.train import state as state_lib
    from phi3jax.train.batch import BATCH_KEYS
    from phi3jax.train.step import OptimConfig, make_optimizer

    cfg = inputs.cfg.replace(**{k: v for k, v in (overrides or {}).items() if v is not None})
    mesh_cfg = parallel.MeshConfig.from_dict({**inputs.mesh, **(mesh_override or {})})
    devices = topology_devices(target)
    mesh = parallel.make_mesh(mesh_cfg, devices=devices)
    shape = dict(mesh.shape)
    parallel.check_model_fits_mesh(cfg, mesh)
    rows = shape["data"] * shape["fsdp"]
    batch = int(batch or inputs.batch or rows)
    seq = int(seq or inputs.seq or min(cfg.original_max_position_embeddings, cfg.max_position_embeddings))
    parallel.check_batch_fits_mesh(batch, seq, mesh)
    optim = OptimConfig(**{k: v for k, v in inputs.optim.items()
                           if k in {f.name for f in dataclasses.fields(OptimConfig)}})
    accum = int(accum_steps or optim.accum_steps)
    if batch % (accum * rows):
        raise PlanError(f"batch {batch} does not split into {accum} micro-batches of whole data shards "
                        f"(mesh.data x mesh.fsdp = {rows})")
    optimizer = make_optimizer(optim, 1000)
    lora = lora if lora is not None else inputs.lora
    dpo = dpo if dpo is not None else inputs.dpo
    if dpo is not None and dpo.reference == "adapter_off" and dpo.uses_reference and lora is None:
        raise PlanError("dpo.reference=adapter_off is the LoRA base with the adapters off: add lora.* settings")

    state = state_lib.abstract_state(cfg, mesh, optimizer, lora)
    batch_sharding = parallel.batch_sharding(mesh)
    keys = BATCH_KEYS + (("ref_logps",) if dpo is not None and dpo.uses_reference and dpo.reference == "precomputed"
                         else ())
    abstract_batch = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k in ("loss_mask", "ref_logps")
                                              else jnp.int32, sharding=batch_sharding) for k in keys}
    frozen = None
    frozen_bytes: dict[str, int | None] = {"frozen_projection_bytes": None, "frozen_other_bytes": None}
    if lora is not None:
        frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              lora_lib.abstract_base(cfg, lora), lora_lib.base_shardings(cfg, lora, mesh))
        proj = [lora_lib.get(frozen["layers"], p.leaf) for p in lora_lib.projections(cfg)]
        frozen_bytes["frozen_projection_bytes"] = parallel.sharded_bytes_per_device(proj)
        frozen_bytes["frozen_other_bytes"] = parallel.sharded_bytes_per_device(frozen) - \
            frozen_bytes["frozen_projection_bytes"]
    reference_bytes = None
    if dpo is None:
        step = state_lib.make_train_step(cfg, mesh, optimizer, accum_steps=accum, lora=lora)
        args: tuple[Any, ...] = (state, abstract_batch) if frozen is None else (state, abstract_batch, frozen)
    else:
        step = state_lib.make_dpo_step(cfg, mesh, optimizer, dpo, accum_steps=accum, lora=lora)
        ref_shardings = state_lib.reference_shardings(cfg, mesh, dpo, lora)
        ref = None if ref_shardings is None else jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state.params, ref_shardings)
        reference_bytes = parallel.sharded_bytes_per_device(ref) if ref is not None else 0
        args = (state, abstract_batch, frozen, ref)
    estimate = None
    if target.platform != "tpu" and devices[0].platform == "cpu":
        estimate = ("estimate from the XLA:CPU compiler on host devices: XLA:GPU fuses and schedules "
                    "differently, so treat temporaries as indicative")
    plan = Plan(model=inputs.name, num_params=cfg.num_params(), target=target.describe(),
                platform=target.platform, estimate_note=estimate, devices=len(devices),
                mesh=shape, batch=batch, seq=seq, accum_steps=accum, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                remat_policy=cfg.remat_policy, attention=_attention_for(cfg, mesh, seq),
                compile_seconds=0.0, fits=False, hbm_bytes=target.chip.hbm_bytes,
                params_bytes=parallel.sharded_bytes_per_device(state.params),
                opt_state_bytes=parallel.sharded_bytes_per_device(state.opt_state),
                batch_bytes=parallel.sharded_bytes_per_device(abstract_batch),
                peak_flops=target.chip.peak_bf16_flops, lora=_describe_lora(lora), dpo=_describe_dpo(dpo),
                reference_bytes=reference_bytes, **frozen_bytes)
    plan.usable_hbm_bytes, plan.usable_hbm_source = usable_hbm(target, devices[0])
    # The mesh is made of the target's devices, so attention_impl=auto picks what that hardware
    # runs (the Pallas kernels on TPU), not what this CPU machine would run.
    # The Mosaic lowering asks for the TPU generation: from the abstract mesh when no TPU is attached.
    on_target = (jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if target.platform == "tpu"
                 else contextlib.nullcontext())
    with on_target:
        plan.flops_total = matmul_flops(step.trace(*args).jaxpr)
    plan.flops_per_device = plan.flops_total / len(devices)
    plan.seconds_at_peak = plan.flops_per_device / target.chip.peak_bf16_flops
    start = time.perf_counter()
    try:
        with on_target:
            compiled = step.lower(*args).compile()
    except Exception as e:  # the TPU compiler refuses programs that do not fit HBM
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        plan.compile_seconds = time.perf_counter() - start
        plan.compiler_message = message.strip().splitlines()[0][:500]
        plan.fits = False
        return plan
    plan.compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    if mem is not None:
        plan.argument_bytes = int(mem.argument_size_in_bytes)
        plan.output_bytes = int(mem.output_size_in_bytes)
        plan.alias_bytes = int(mem.alias_size_in_bytes)
        plan.temp_bytes = int(mem.temp_size_in_bytes)
        plan.code_bytes = int(mem.generated_code_size_in_bytes)
        plan.peak_bytes = (plan.argument_bytes + plan.output_bytes - plan.alias_bytes + plan.temp_bytes
                           + plan.code_bytes)
        plan.fits = fits_hbm(plan.peak_bytes, plan.usable_hbm_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if cost and cost.get("flops") is not None:
        plan.compiler_flops_per_device = float(cost["flops"])
    return plan


def _describe_lora(lora: Any) -> str | None:
    if lora is None:
        return None
    return (f"rank {lora.rank}, alpha {lora.alpha:g}, targets {','.join(lora.targets)}, base {lora.base_dtype}"
            + (f", dropout {lora.dropout:g}" if lora.dropout else ""))


def _describe_dpo(dpo: Any) -> str | None:
    if dpo is None:
        return None
    ref = f"reference {dpo.reference}" if dpo.uses_reference else "no reference"
    return f"loss {dpo.loss}, beta {dpo.beta:g}, {ref}"


def _attention_for(cfg: Any, mesh: Any, seq: int) -> str:
    """The attention backend the target runs for training, as the dispatcher decides it there."""
    from phi3jax.ops.attention import platform_of, select_backend

    choice = select_backend(cfg.attention_impl, "self", platform=platform_of(mesh), mesh=mesh, length=seq,
                            has_segments=True, dtype=cfg.dtype)
    return choice.backend


# ------------------------------------------------------------------------------ report
def _gb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:8.3f} GiB"


def _hbm(plan: Plan) -> str:
    """'15.750 GiB usable (of 16.000 GiB HBM, as the TPU compiler reports it)', or the HBM alone."""
    if plan.usable_hbm_bytes is None or plan.usable_hbm_bytes == plan.hbm_bytes:
        return f"{_gb(plan.hbm_bytes).strip()} HBM"
    return (f"{_gb(plan.usable_hbm_bytes).strip()} usable (of {_gb(plan.hbm_bytes).strip()} HBM, "
            f"{plan.usable_hbm_source})")


def format_plan(plan: Plan) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        f"phi3jax plan: {plan.model} ({plan.num_params:,} parameters) on {plan.target}",
        f"  mesh {mesh}; global batch {plan.batch} x {plan.seq} tokens"
        + (f" in {plan.accum_steps} micro-batches" if plan.accum_steps > 1 else "")
        + f"; compute {plan.dtype}, parameters {plan.param_dtype}, remat {plan.remat_policy}, "
        f"attention {plan.attention}",
        (f"  compiled by the TPU compiler (libtpu) in {plan.compile_seconds:.1f} s, without hardware"
         if plan.platform == "tpu" else
         f"  compiled by XLA:CPU standing in for {plan.platform.upper()} in {plan.compile_seconds:.1f} s"
         if plan.estimate_note else f"  compiled for the attached GPU(s) in {plan.compile_seconds:.1f} s"),
    ]
    if plan.estimate_note:
        lines.append(f"  NOTE: {plan.estimate_note}")
    inputs = plan.params_bytes + plan.opt_state_bytes + plan.batch_bytes
    if plan.lora is not None:
        frozen = (plan.frozen_projection_bytes or 0) + (plan.frozen_other_bytes or 0)
        inputs += frozen
        lines += [f"  LoRA: {plan.lora}", "", "per-device memory",
                  f"  frozen base, projections        {_gb(plan.frozen_projection_bytes)}",
                  f"  frozen base, embeddings + norms {_gb(plan.frozen_other_bytes)}",
                  f"  adapters                        {_gb(plan.params_bytes)}",
                  f"  adapters' optimiser state       {_gb(plan.opt_state_bytes)}"]
    else:
        lines += ["", "per-device memory",
                  f"  parameters                      {_gb(plan.params_bytes)}",
                  f"  optimiser state (AdamW mu, nu)  {_gb(plan.opt_state_bytes)}"]
    if plan.dpo is not None:
        inputs += plan.reference_bytes or 0
        lines.insert(3 if not plan.estimate_note else 4, f"  DPO: {plan.dpo}")
        lines.append(f"  reference weights               {_gb(plan.reference_bytes)}"
                     + ("  (a frozen copy)" if plan.reference_bytes else "  (none of its own)"))
    lines.append(f"  batch                           {_gb(plan.batch_bytes)}")
    if plan.argument_bytes is not None:
        padding = plan.argument_bytes - inputs
        lines += [
            f"  arguments as compiled           {_gb(plan.argument_bytes)}  (layout padding {_gb(padding).strip()})",
            f"  temporaries (activations, grads){_gb(plan.temp_bytes)}",
            f"  outputs not aliased to inputs   {_gb(plan.output_bytes - plan.alias_bytes)}",
            f"  program                         {_gb(plan.code_bytes)}",
            f"  peak                            {_gb(plan.peak_bytes)}  of {_hbm(plan)}: "
            + ("fits" if plan.fits else "DOES NOT FIT"),
        ]
    else:
        lines.append(f"  DOES NOT FIT in {_hbm(plan)}: {plan.compiler_message}")
    if plan.flops_total is not None:
        tokens = plan.batch * plan.seq
        lines += [
            "",
            "compute",
            f"  step FLOPs  {plan.flops_total:.3e} in all, {plan.flops_per_device:.3e} per device "
            f"(every matmul of the step; 6 x params x tokens = {6 * plan.num_params * tokens:.3e})",
        ]
        if plan.compiler_flops_per_device is not None:
            lines.append(f"  compiler cost analysis  {plan.compiler_flops_per_device:.3e} per device "
                         "(XLA counts each scanned layer once)")
        lines.append(f"  at peak ({plan.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip): at least "
                     f"{plan.seconds_at_peak * 1e3:.3g} ms per step, "
                     f"{tokens / plan.seconds_at_peak / plan.devices:,.0f} tokens/s per chip")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="compile the train step for a TPU topology and report memory / FLOPs",
        description="Compile the real train step ahead of time for a TPU topology (libtpu, no TPU needed) and "
                    "report per-device memory, whether it fits HBM, and the step's FLOPs.")
    p.add_argument("--config", required=True, help="a preset (phi-3-mini-4k), a train YAML or an HF config.json/dir")
    p.add_argument("--target", required=True, help=f"the hardware: {_known_targets()}")
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. fsdp=16,tensor=4 (default: the config's, else "
                                                "fsdp over every chip)")
    p.add_argument("--num-slices", type=int, default=1, help="TPU slices joined over DCN (multi-slice)")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: one per data shard)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the original context)")
    p.add_argument("--accum-steps", type=int, default=None, help="gradient-accumulation micro-batches")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype")
    p.add_argument("--param-dtype", choices=DTYPES, default=None)
    p.add_argument("--remat", choices=REMAT_POLICIES, default=None, help="remat policy")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default=None,
                   help="attention_impl (default: the config's; auto is what the target runs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="plan the LoRA step with lora.KEY=VALUE (train.py's lora.* keys: rank, alpha, dropout, "
                        "targets, base_dtype) and the preference step with objective=dpo and dpo.KEY=VALUE (loss, "
                        "reference, ...); a YAML's lora: and dpo: sections are used by default")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from phi3jax.parallel import MeshConfig

    target = parse_target(args.target, args.num_slices)
    mesh = dataclasses.asdict(MeshConfig.parse(args.mesh)) if args.mesh else None
    if mesh is not None:  # only the axes named on the command line override the config's
        given = {item.split("=")[0].strip() for item in args.mesh.split(",") if item.strip()}
        mesh = {k: v for k, v in mesh.items() if k in given}
    if target.platform != "tpu":  # host devices stand in for GPUs when none are attached
        _ensure_host_devices(target.chips)
    inputs = plan_inputs(args.config)
    overrides = {"dtype": args.dtype, "param_dtype": args.param_dtype, "remat_policy": args.remat,
                 "attention_impl": args.attention}
    lora = lora_overrides(inputs.lora, [s for s in args.settings if s.startswith("lora.")])
    inputs.dpo = dpo_overrides(inputs.dpo, [s for s in args.settings if not s.startswith("lora.")])
    plan = make_plan(inputs, target, mesh, args.batch, args.seq, args.accum_steps, overrides, lora)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0


def _ensure_host_devices(n: int) -> None:
    """GPU estimates compile on n host devices; ask XLA for them if no backend has started yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
