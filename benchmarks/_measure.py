"""What every benchmark here measures the same way: median wall time, and this machine's float32
matmul rate as torch and JAX reach it (the peak that MFU-style fractions are taken against)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs, after `warmup` runs (compilation included there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median step time of each, timing them in turn so that both see the same machine load."""
    for step in steps.values():
        step()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_gflops(n: int = 2048) -> dict[str, float]:
    """float32 matmul GFLOP/s of this machine, as JAX (XLA) and, when installed, torch reach it."""
    a = np.random.rand(n, n).astype(np.float32)
    flops = 2 * n**3
    ja = jnp.asarray(a)
    mm = jax.jit(jnp.matmul)
    out = {"jax": flops / timeit(lambda: mm(ja, ja).block_until_ready(), 5) / 1e9}
    try:
        import torch
    except ImportError:
        return out
    ta, tb = torch.from_numpy(a), torch.from_numpy(a.copy())
    out["torch"] = flops / timeit(lambda: torch.mm(ta, tb), 5) / 1e9
    return out
