"""Resumable to the bit: runs killed (SIGKILL between saves and during an async save, SIGTERM) and
restarted log the same loss at every step, and end with the same parameters, as a run that never stopped."""

from __future__ import annotations

import os

import numpy as np
import pytest
from train_with_faults import fault_hook
from trainutil import run_train_py, small_config, write_config, write_corpus

from phi3jax.train import checkpoint as ckpt
from phi3jax.train import loop
from phi3jax.train.metrics import read_metrics

STEPS, SAVE_EVERY = 12, 4


def _losses(run_dir):
    records = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    return {r["step"]: r["loss"] for r in records}, [r["step"] for r in records]


def _params(run_dir):
    return ckpt.load_run(run_dir)[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run."""
    cfg = small_config(tmp_path_factory.mktemp("reference") / "run", corpus, steps=STEPS, save_every=SAVE_EVERY)
    assert loop.train(cfg).step == STEPS
    return cfg.run_dir


def test_killed_and_restarted_runs_match_an_uninterrupted_run_bit_for_bit(tmp_path, corpus, reference, capsys):
    cfg = small_config(tmp_path / "run", corpus, steps=STEPS, save_every=SAVE_EVERY)
    config = write_config(cfg, tmp_path / "cfg.yaml")
    run_dir = cfg.run_dir

    # 1. SIGKILL between saves (step 6; the last checkpoint is 4).
    first = run_train_py(["--config", config], fault="kill_after_step:6")
    assert first.returncode == -9, first.stderr[-3000:]
    assert ckpt.list_steps(run_dir) == [4]
    assert max(_losses(run_dir)[0]) == 6

    # 2. Resume from 4; SIGKILL while the asynchronous save of step 8 is being written.
    second = run_train_py(["--config", config], fault="kill_in_save:8")
    assert second.returncode == -9, second.stderr[-3000:]
    assert "resuming at step 4" in second.stdout
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    if "8" not in names:  # killed mid-write (the usual case): orbax's temporary directory is left behind
        assert any(n.startswith("8.orbax-checkpoint-tmp") for n in names), names
    assert ckpt.list_steps(run_dir) in ([4], [4, 8])  # a half-written step is never listed...
    ckpt.load_run(run_dir)  # ...and whatever is listed restores

    # 3. Resume (in this process); SIGTERM after step 10 saves and returns cleanly.
    third = loop.train(cfg, on_step=fault_hook("sigterm_after_step:10"))
    assert third.status == "preempted" and third.step == 10
    assert "SIGTERM: saved step 10" in capsys.readouterr().out
    assert ckpt.list_steps(run_dir)[-1] == 10

    # 4. Resume to the end.
    assert loop.train(cfg).step == STEPS
    assert "resuming at step 10" in capsys.readouterr().out

    ref_losses, ref_steps = _losses(reference)
    losses, steps = _losses(run_dir)
    assert ref_steps == steps == list(range(1, STEPS + 1))  # resumed steps are logged once
    assert losses == ref_losses  # float equality of every step's float32 loss
    for a, b in zip(_leaves(_params(run_dir)), _leaves(_params(reference)), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_finished_run_rerun_does_nothing_more(reference):
    before = _losses(reference)
    result = loop.train(small_config(reference, _corpus_of(reference), steps=STEPS, save_every=SAVE_EVERY))
    assert result.step == STEPS and _losses(reference) == before


def _corpus_of(run_dir):
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)["data"]["path"]


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
