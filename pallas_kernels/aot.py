"""Ahead-of-time compiles for real TPUs (libtpu's compiler) and exports for CUDA GPUs, from a CPU machine.

    compiled = compile_for_tpu(fn, args, topology="v5e:2x2")

`args` may hold jax.ShapeDtypeStruct or arrays; they are placed on one compile-only
device of the topology. This runs the Mosaic compiler on every Pallas TPU kernel inside
`fn`, which rejects block shapes, layouts and ops that the interpreter accepts.

    exported = export_for_cuda(fn, args)   # a jax.export.Exported for platform "cuda"
    triton_calls(exported)                 # how many Triton kernels it holds

This runs the Pallas -> Triton lowering of every Pallas GPU kernel inside `fn` (no GPU needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Several processes on one host may load libtpu at once (CI, tests, other tools); without
# this, libtpu takes a host-wide lock and a second process cannot create a topology.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from jax import export  # noqa: E402

TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _stderr_kept_unless_failure() -> Iterator[None]:
    """Hold back what native code writes to stderr (fd 2) inside the block; replay it on an exception.

    libtpu, loaded without TPU chips attached, prints several lines about the TPU host it cannot
    find (worker hostnames, accelerator type). A compile-only topology needs neither.
    """
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tpu_topology(topology: str = "v5e:2x2", **kwargs: Any) -> Any:
    """Compile-only devices of a TPU topology ('v5e:2x2', 'v5p:2x2x1', 'v6e:2x2', ...) from libtpu's
    compiler, with no TPU attached. kwargs go to `jax.experimental.topologies.get_topology_desc`."""
    from jax.experimental import topologies

    with _stderr_kept_unless_failure():
        return topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)


def tpu_device(topology: str = "v5e:2x2"):
    """One compile-only TPU device of `topology`."""
    return tpu_topology(topology).devices[0]


def compile_for_tpu(fn: Callable, args: Sequence[Any], topology: str = "v5e:2x2", **jit_kwargs):
    """jax.jit(fn) lowered and compiled for `topology`; returns the Compiled object."""
    device = tpu_device(topology)
    sharding = jax.sharding.make_single_device_sharding(device)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), list(args))
    # The default device tells Pallas (and phi3jax's attention dispatch) which chip it targets.
    with jax.default_device(device):
        return jax.jit(fn, **jit_kwargs).lower(*specs).compile()


def cost(compiled) -> dict[str, float]:
    """flops / bytes accessed / transcendentals from a compiled program's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return {key: float(analysis.get(key, 0.0)) for key in ("flops", "bytes accessed", "transcendentals")}


# ------------------------------------------------------------------------------ CUDA export
TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call a Pallas Triton kernel lowers to
CUDA_DEVICE_KIND = "NVIDIA A100"  # compute capability 8.0: what jax 0.10 assumes without a GPU


def abstract_gpu_device(device_kind: str = CUDA_DEVICE_KIND):
    """A `jax.sharding.AbstractDevice` for a GPU of `device_kind` (a name jax knows: 'NVIDIA A100',
    'NVIDIA H100', ...), or None on a jax whose AbstractDevice has no `platform` (jax 0.10), whose
    Triton lowering does not consult it."""
    if "platform" not in {field.name for field in dataclasses.fields(jax.sharding.AbstractDevice)}:
        return None
    return jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")


@contextlib.contextmanager
def abstract_gpu(device_kind: str = CUDA_DEVICE_KIND) -> Iterator[None]:
    """Inside the block, jax lowers Pallas GPU kernels for a `device_kind` GPU with none attached.

    Sets an abstract mesh that carries the abstract GPU device: the current abstract mesh with that
    device if one is set (its axes kept), else a mesh with no axes. A no-op on jax 0.10.
    """
    device = abstract_gpu_device(device_kind)
    if device is None:
        yield
        return
    current = jax.sharding.get_abstract_mesh()
    if current.empty:
        mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    else:
        mesh = current.update(abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def export_for_cuda(fn: Callable, args: Sequence[Any], *, device_kind: str = CUDA_DEVICE_KIND,
                    disabled_checks: Sequence[export.DisabledSafetyCheck] = (), **jit_kwargs) -> export.Exported:
    """jax.jit(fn) exported for platform "cuda" from any machine; runs the Pallas -> Triton lowering.

    `args` may hold jax.ShapeDtypeStruct or arrays. The Triton lowering needs the target GPU's
    compute capability. jax 0.10 took it from a local GPU and, without one, assumed 8.0. jax 0.12
    (`gpu_info.get_gpu_info()`, called from the Pallas Triton `pallas_call_lowering` in
    jax/_src/pallas/triton/pallas_call_registration.py) reads it from the abstract device of the
    current abstract mesh, else from the default device. With no GPU, and no abstract device,
    it raises "No supported GPU devices found, please specify an abstract GPU device using
    AbstractDevice". So the export runs under `abstract_gpu(device_kind)`; device_kind sets the
    compute capability (jax 0.10 ignores it). The Triton kernels are custom calls
    outside jax.export's stable set; that check is disabled for them (and for `disabled_checks`).
    """
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL), *disabled_checks]
    with abstract_gpu(device_kind):
        return export.export(jax.jit(fn, **jit_kwargs), platforms=["cuda"], disabled_checks=checks)(*args)


def triton_calls(exported: export.Exported) -> int:
    """How many Triton kernel calls an exported module holds."""
    return exported.mlir_module().count(f"custom_call @{TRITON_CALL}(")
