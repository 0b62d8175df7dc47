"""Ahead-of-time compiles for real TPUs from a CPU machine (libtpu's compiler, no TPU needed).

    compiled = compile_for_tpu(fn, args, topology="v5e:2x2")

`args` may hold jax.ShapeDtypeStruct or arrays; they are placed on one compile-only
device of the topology. This runs the Mosaic compiler on every Pallas TPU kernel inside
`fn`, which rejects block shapes, layouts and ops that the interpreter accepts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Several processes on one host may load libtpu at once (CI, tests, other tools); without
# this, libtpu takes a host-wide lock and a second process cannot create a topology.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

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
