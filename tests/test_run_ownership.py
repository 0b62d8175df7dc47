"""One training per run directory, resumes that may not silently change the run, Ctrl-C that saves,
and no empty run directory left by a run that never started (phi3jax.train.rundir, the loop)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml
from trainutil import REPO, run_train_py, small_config, write_config, write_corpus

from phi3jax.train import checkpoint as ckpt
from phi3jax.train import loop, rundir
from phi3jax.train.data import DataError
from phi3jax.train.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=8)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, host, pid, age_s=0.0):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, rundir.LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "since": "2026-01-01T00:00:00+00:00"}, f)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


# ----------------------------------------------------------------------------- the lock
def test_a_second_training_on_a_held_run_dir_is_refused_with_the_holder_named(tmp_path, corpus):
    cfg = small_config(tmp_path / "run", corpus, steps=4, save_every=2)
    config = write_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    first = subprocess.Popen([sys.executable, str(REPO / "tests" / "train_with_faults.py"), "hold_after_step:2",
                              "--config", config], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (os.path.exists(os.path.join(cfg.run_dir, "metrics.jsonl")) and 2 in _losses(cfg.run_dir)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        saved_config = open(os.path.join(cfg.run_dir, ckpt.CONFIG_FILE)).read()
        second = run_train_py(["--config", config, "optim.learning_rate=1e-2"])
        assert second.returncode == 2
        message = second.stderr.strip().splitlines()
        assert len(message) == 1, second.stderr
        assert f"host {socket.gethostname()}, pid {first.pid}, since" in message[0] and "in use" in message[0]
        assert "new run" not in second.stdout and "resuming" not in second.stdout
        assert open(os.path.join(cfg.run_dir, ckpt.CONFIG_FILE)).read() == saved_config  # nothing written
    finally:
        open(os.path.join(cfg.run_dir, "release"), "w").close()
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert sorted(_losses(cfg.run_dir)) == [1, 2, 3, 4]  # one run's steps, each once
    assert not os.path.exists(os.path.join(cfg.run_dir, rundir.LOCK_FILE))  # released at the end


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, socket.gethostname(), _dead_pid())  # a training killed on this host
    assert loop.train(small_config(run_dir, corpus, steps=2)).step == 2
    out = capsys.readouterr().out
    assert "taking over a stale lock" in out and "has exited" in out
    assert not os.path.exists(run_dir / rundir.LOCK_FILE)


def test_locks_of_live_processes_and_other_hosts(tmp_path):
    live = _write_lock(tmp_path / "a", socket.gethostname(), os.getppid())
    with pytest.raises(rundir.RunDirBusy, match=f"pid {os.getppid()}"):
        rundir.RunLock.acquire(str(tmp_path / "a"))
    assert json.load(open(live))["pid"] == os.getppid()  # left to its holder
    _write_lock(tmp_path / "b", "another-host", 123, age_s=60)  # heartbeat a minute ago: held
    with pytest.raises(rundir.RunDirBusy, match="host another-host, pid 123"):
        rundir.RunLock.acquire(str(tmp_path / "b"))
    _write_lock(tmp_path / "c", "another-host", 123, age_s=rundir.STALE_AFTER_S + 60)  # heartbeat stopped
    lock = rundir.RunLock.acquire(str(tmp_path / "c"))
    assert json.load(open(lock.path))["pid"] == os.getpid()
    with pytest.raises(rundir.RunDirBusy):  # held now, by this process
        rundir.RunLock.acquire(str(tmp_path / "c"))
    lock.release()
    assert not os.path.exists(lock.path)


# ----------------------------------------------------------------------------- resume
def test_a_resume_that_changes_the_run_is_refused_unless_allowed(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    assert loop.train(small_config(run_dir, corpus, steps=4, save_every=2)).step == 4
    saved = (run_dir / ckpt.CONFIG_FILE).read_text()
    assert yaml.safe_load(saved)["run_dir"] == str(run_dir)  # the resolved value, not null

    with pytest.raises(rundir.ResumeChanged) as refused:
        loop.train(small_config(run_dir, corpus, steps=6, save_every=2, **{"optim.learning_rate": 1e-2}))
    message = str(refused.value)
    assert "optim.learning_rate: 0.003 -> 0.01" in message and rundir.ALLOW_KEY in message
    assert "steps" not in message.split(":\n", 1)[1]  # steps may change
    assert (run_dir / ckpt.CONFIG_FILE).read_text() == saved and ckpt.list_steps(run_dir) == [2, 4]
    assert not (run_dir / rundir.LOCK_FILE).exists()

    first_doc = sorted(os.listdir(corpus))[0]
    changed_corpus = tmp_path / "corpus"
    write_corpus(changed_corpus, n_docs=8)
    (changed_corpus / first_doc).write_text("different text\n" * 20)
    with pytest.raises(rundir.ResumeChanged, match=f"data train: .*{first_doc}"):
        loop.train(small_config(run_dir, str(changed_corpus), steps=6, save_every=2))

    # Harmless changes (steps, logging, saving) resume; the same data under another path is the same data.
    write_corpus(tmp_path / "copy", n_docs=8)
    result = loop.train(small_config(run_dir, str(tmp_path / "copy"), steps=6, save_every=3, **{"log.every": 2}))
    assert result.step == 6 and "resuming at step 4" in capsys.readouterr().out
    result = loop.train(small_config(run_dir, corpus, steps=8, save_every=2, **{"optim.learning_rate": 1e-2,
                                                                                 "resume.allow_changes": True}))
    assert result.step == 8
    assert "resuming" in capsys.readouterr().out
    assert yaml.safe_load((run_dir / ckpt.CONFIG_FILE).read_text())["optim"]["learning_rate"] == 1e-2


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_saves_exits_130_and_the_resume_is_bit_identical(tmp_path, corpus):
    reference = small_config(tmp_path / "reference", corpus, steps=8, save_every=4)
    assert loop.train(reference).step == 8
    cfg = small_config(tmp_path / "run", corpus, steps=8, save_every=4)
    config = write_config(cfg, tmp_path / "cfg.yaml")

    interrupted = run_train_py(["--config", config], fault="sigint_after_step:6")
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr and "KeyboardInterrupt" not in interrupted.stderr
    assert "Ctrl-C: saved step 6" in interrupted.stdout and "rerun the same command to resume" in interrupted.stdout
    assert ckpt.list_steps(cfg.run_dir) == [4, 6]

    resumed = run_train_py(["--config", config])
    assert resumed.returncode == 0 and "resuming at step 6" in resumed.stdout, resumed.stderr[-3000:]
    assert _losses(cfg.run_dir) == _losses(reference.run_dir)  # every step's float32 loss, bit for bit


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path, corpus):
    cfg = small_config(tmp_path / "run", corpus, steps=8, save_every=4)
    proc = run_train_py(["--config", write_config(cfg, tmp_path / "cfg.yaml")], fault="sigint_twice_after_step:6")
    assert proc.returncode == 130 and "second Ctrl-C" in proc.stderr and "Traceback" not in proc.stderr
    assert ckpt.list_steps(cfg.run_dir) == [4]


# ----------------------------------------------------------------------------- failed set-ups
def test_a_run_that_fails_validation_leaves_no_run_dir(tmp_path, corpus):
    with pytest.raises(DataError, match="matches no file"):
        loop.train(small_config(tmp_path / "missing", str(tmp_path / "no-such-data")))
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="seq_len=256 exceeds"):  # after the tokenizer was trained into it
        loop.train(small_config(tmp_path / "too-long", corpus, seq_len=256))
    assert not (tmp_path / "too-long").exists()
    (tmp_path / "existing").mkdir()  # a directory the user made is kept
    with pytest.raises(DataError):
        loop.train(small_config(tmp_path / "existing", str(tmp_path / "no-such-data")))
    assert (tmp_path / "existing").is_dir()
