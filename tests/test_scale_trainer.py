"""train.py on a mesh: `mesh.fsdp=4 mesh.tensor=2` on 8 host devices, and two processes with 4
devices each, log the same losses as one device; a run saved by two processes continues in one, and
the reverse, with the losses of a run that never stopped (the data order is global).

The runs go through the real command (`train.py`, the config system, the data pipeline, orbax
checkpoints), each in a fresh process so the host device count can be set. Float32 throughout;
sharded runs sum in a different order, hence the 1e-5 tolerance.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from trainutil import REPO, small_config, write_config, write_corpus

from phi3jax.train import checkpoint as ckpt
from phi3jax.train.metrics import read_metrics

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
STEPS = 5


def env_for(devices: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {_FAST_COMPILE}"}


def train_cmd(config: str, *overrides: str, fault: str | None = None) -> list[str]:
    program = [str(REPO / "train.py")] if fault is None else [str(REPO / "tests" / "train_with_faults.py"), fault]
    return [sys.executable, *program, "--config", config, *overrides]


def losses(run_dir: str) -> list[float]:
    """Each step's training loss (a resumed run's steps once each, in order)."""
    by_step = {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}
    assert sorted(by_step) == list(range(1, len(by_step) + 1)), sorted(by_step)
    return [by_step[k] for k in sorted(by_step)]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("trainer")
    corpus = write_corpus(d / "corpus", n_docs=12)
    # 2 query heads, 1 kv head (replicated over tensor=2), hidden 32 (fsdp=4 -> 8 per device).
    cfg = small_config(d / "unused", corpus, steps=STEPS, batch_size=8, seq_len=32, save_every=STEPS,
                       async_checkpointing=False)
    return write_config(cfg, d / "small.yaml")


def run_single(config: str, run_dir: str, devices: int, *overrides: str, fault: str | None = None) -> list[float]:
    proc = subprocess.run(train_cmd(config, f"run_dir={run_dir}", *overrides, fault=fault), cwd=REPO,
                          env=env_for(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def one_device(config, tmp_path_factory) -> list[float]:
    return run_single(config, str(tmp_path_factory.mktemp("one") / "run"), 1)


@pytest.fixture(scope="module")
def eight_devices(config, tmp_path_factory) -> tuple[list[float], str]:
    run_dir = str(tmp_path_factory.mktemp("eight") / "run")
    return run_single(config, run_dir, 8, "mesh.fsdp=4", "mesh.tensor=2"), run_dir


def test_train_py_on_fsdp4_tensor2_logs_the_same_losses_as_one_device(one_device, eight_devices):
    got, run_dir = eight_devices
    assert len(got) == len(one_device) == STEPS
    np.testing.assert_allclose(got, one_device, atol=1e-5, rtol=0)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "fsdp: 4" in f.read()


def run_two_processes(config: str, run_dir: str, devices_each: int, *overrides: str, fault: str | None = None
                      ) -> list[tuple[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        train_cmd(config, f"run_dir={run_dir}", *overrides, f"distributed.coordinator=127.0.0.1:{port}",
                  "distributed.num_processes=2", f"distributed.process_id={i}", fault=fault),
        cwd=REPO, env=env_for(devices_each), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate())
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return outs


MESH = ("mesh.fsdp=4", "mesh.tensor=2")


def test_train_py_on_two_processes_with_four_devices_each(config, tmp_path, eight_devices):
    # The global batch of each step is the same whichever processes build its rows, so two processes
    # of four devices log the losses of one process of eight.
    run_dir = str(tmp_path / "run")
    outs = run_two_processes(config, run_dir, 4, *MESH)
    np.testing.assert_allclose(losses(run_dir), eight_devices[0], atol=1e-5, rtol=0)
    # Process 0 alone logs; both processes wrote their shards of the final checkpoint.
    assert "2 processes" in outs[0][0] and "run_dir" not in outs[1][0]
    assert ckpt.list_steps(run_dir) == [STEPS]


def test_a_run_saved_by_two_processes_continues_in_one_and_the_reverse(config, tmp_path, eight_devices):
    two_then_one, one_then_two = str(tmp_path / "two_then_one"), str(tmp_path / "one_then_two")
    run_two_processes(config, two_then_one, 4, *MESH, fault="sigterm_after_step:2")
    assert ckpt.list_steps(two_then_one) == [2]
    run_single(config, two_then_one, 8, *MESH)
    run_single(config, one_then_two, 8, *MESH, fault="sigterm_after_step:3")
    assert ckpt.list_steps(one_then_two) == [3]
    outs = run_two_processes(config, one_then_two, 4, *MESH)
    assert "resuming at step 3" in outs[0][0]
    for run_dir in (two_then_one, one_then_two):
        np.testing.assert_allclose(losses(run_dir), eight_devices[0], atol=1e-5, rtol=0)
