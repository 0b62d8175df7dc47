"""Process-level set-up of the command-line programs (`train.py`, `phi3jax ...`); nothing else calls it.

`prepare()` does two things before JAX's runtime starts:

* On a machine with no accelerator attached, JAX runs on the CPU only (`JAX_PLATFORMS=cpu`), so
  an installed libtpu (the `dev` and `tpu` extras) is never probed for TPU chips that are not
  there; probing prints five lines of libtpu warnings on every command.
* On CPU hosts, freed memory is reused instead of page-faulted in again (below).

Host memory: reuse freed memory instead of page-faulting it in again.

When XLA runs on the CPU, every call of a compiled program allocates its scratch space afresh:
one block for all intermediate values (1.8 GB for the training step in benchmarks/bench_train.py).
glibc serves a block that large with `mmap` and unmaps it when the call ends, so the next call
page-faults through the whole block again: ~450,000 page faults and ~0.9 s of kernel time per
training step on 2 cores, 15-25% of the step.

glibc keeps freed memory for reuse instead when its tunables say so: one heap for all threads
(`arena_max=1`), large blocks from that heap rather than from `mmap` (`mmap_max=0`), never trimmed
(`trim_threshold`), and no per-thread cache of small blocks (`tcache_count=0`: the small pieces
that aligned allocations split off would otherwise sit in that cache, keep freed blocks from
merging, and let the heap grow by one block per call). The cost: the process keeps its peak
memory until it exits, as a caching allocator would.

glibc reads its tunables only when a process starts, so `reexec_with_memory_reuse()` runs the
command again, in place (`os.execve`, same process id), with `GLIBC_TUNABLES` set. The entry points
that run a model (`train.py`, `phi3jax generate | chat | eval`) do so first. It does nothing where a
GPU or TPU is attached (unless `JAX_PLATFORMS=cpu`), where the C library is not glibc, or when
`PHI3JAX_HOST_MEMORY=release` is set.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

ENV = "PHI3JAX_HOST_MEMORY"  # "reuse" (default) or "release" (leave glibc's defaults alone)
TUNABLES = (
    ("glibc.malloc.arena_max", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(2**62)),
    ("glibc.malloc.tcache_count", "0"),
)
# Device files of accelerators JAX would run on instead of the CPU: NVIDIA GPUs, TPU v4 and earlier
# (/dev/accel*), TPU v5e and later (/dev/vfio/N), AMD GPUs (/dev/kfd).
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def accelerator_attached() -> bool:
    """True if this host has a device file of an accelerator JAX could run on."""
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def prepare(reuse_memory: bool = True) -> None:
    """Set up this process for a command: CPU-only JAX where no accelerator is attached (unless
    JAX_PLATFORMS says otherwise), then, if `reuse_memory`, start over with glibc's memory-reuse
    settings where they apply (`reexec_with_memory_reuse`)."""
    if "JAX_PLATFORMS" not in os.environ and not accelerator_attached():
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # jax read the variable when it was imported: tell its config too
            sys.modules["jax"].config.update("jax_platforms", "cpu")
    if reuse_memory:
        reexec_with_memory_reuse()


def glibc_tunables(current: str = "") -> str:
    """`current` (a GLIBC_TUNABLES value) with the memory-reuse settings added; settings already
    in `current` are kept as they are."""
    items = [item for item in current.split(":") if item]
    present = {item.split("=", 1)[0] for item in items}
    return ":".join(items + [f"{name}={value}" for name, value in TUNABLES if name not in present])


def memory_reuse_active() -> bool:
    """True if this process started with the memory-reuse settings."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    return bool(current) and glibc_tunables(current) == current


def why_not_reuse() -> str | None:
    """Why this process should keep glibc's defaults, or None when reuse applies."""
    if os.environ.get(ENV, "reuse").strip().lower() == "release":
        return f"{ENV}=release"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018  (AttributeError where the C library is not glibc)
    except (OSError, AttributeError):
        return "the C library is not glibc"
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        first = platforms.split(",")[0].strip()
        return None if first == "cpu" else f"JAX runs on {first} (JAX_PLATFORMS={platforms})"
    if accelerator_attached():
        return "an accelerator is attached"
    return None


def reexec_with_memory_reuse() -> None:
    """Run this command again in place with glibc's memory-reuse settings, if they apply and are
    not in effect yet; otherwise return. Call it first thing in a program's entry point."""
    if memory_reuse_active() or why_not_reuse() is not None:
        return
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is not None and bridge.backends_are_initialized():
        return  # JAX's runtime holds state already: starting over would lose it
    if not sys.executable or not sys.orig_argv:
        return  # an embedded interpreter: no command to start over
    env = {**os.environ, "GLIBC_TUNABLES": glibc_tunables(os.environ.get("GLIBC_TUNABLES", ""))}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:
        return  # could not start over: carry on with glibc's defaults
