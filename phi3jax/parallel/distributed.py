"""Joining a multi-process run: `jax.distributed` is the engine; this only reads the config for it.

    initialize_distributed({"coordinator": "10.0.0.2:1234", "num_processes": 2, "process_id": 0})

On a TPU VM pod slice nothing needs to be given: JAX finds its peers itself. On CPU hosts the
collectives go through gloo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


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


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(len(data)))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, sizes, strict=True)]


def broadcast_flag(value: bool) -> bool:
    """Process 0's `value`, on every process (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))
