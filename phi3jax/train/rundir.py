"""One training per run directory, and what a resumed run may change.

    run_dir/train.lock   the owner: {"host", "pid", "since"} of process 0 of the training that holds it,
                         its modification time refreshed every HEARTBEAT_S seconds while it runs
    run_dir/data.json    the data identity: each file's size and SHA-256, and the train/validation split

A second training on the same directory is refused with one line naming the holder. A lock whose
holder is gone (its process has exited on this host, or its heartbeat stopped STALE_AFTER_S ago) is
taken over with a message. A resume whose config or data differ from the saved ones in anything
that changes the run is refused with the list of differences, unless `resume.allow_changes=true`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from phi3jax.train.config import TrainConfigError

LOCK_FILE = "train.lock"
DATA_FILE = "data.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# Keys a resumed run may change: how long it runs, how it logs and saves, where and on what it runs.
CHANGEABLE = ("steps", "save_every", "keep_checkpoints", "async_checkpointing", "log", "mesh", "distributed",
              "run_dir", "name", "resume", "model.attention_impl", "model.remat_policy",
              # where the data and tokenizer are read from: their content is checked through data.json
              "data.path", "data.val_path", "data.tokenizer")
ALLOW_KEY = "resume.allow_changes=true"
FULL_HASH_BYTES = 256 << 20  # larger files: size + SHA-256 of their first and last 16 MiB


class RunDirBusy(TrainConfigError):
    """The run directory is held by another training."""


class ResumeChanged(TrainConfigError):
    """The resumed run's config or data differ from the saved ones."""


# ----------------------------------------------------------------------------- the lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _describe(holder: Mapping[str, Any]) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def _stale(holder: Mapping[str, Any] | None, age: float) -> str | None:
    """Why a lock is stale (its holder is gone), or None while it is held."""
    if holder is None:
        return "the lock file is unreadable" if age > 10 else None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} has exited"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


@dataclasses.dataclass
class RunLock:
    """The lock of one run directory, held by this process until `release`."""

    path: str
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: str) -> RunLock:
        """Take the run directory's lock, or raise RunDirBusy naming its holder."""
        path = os.path.join(run_dir, LOCK_FILE)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = _read_lock(path)
                reason = _stale(holder, age)
                if reason is None:
                    raise RunDirBusy(f"run_dir {run_dir} is in use by another training ({_describe(holder)}); "
                                     "wait for it to finish or stop it, or train into another run_dir") from None
                print(f"run_dir {run_dir}: taking over a stale lock ({_describe(holder or {})}: {reason})",
                      flush=True)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            lock = cls(path)
            lock._thread = threading.Thread(target=lock._heartbeat, name="run-dir-lock", daemon=True)
            lock._thread.start()
            return lock
        raise RunDirBusy(f"run_dir {run_dir}: another training took the lock first; train into another run_dir")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        holder, _ = _read_lock(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.path)


def _read_lock(path: str) -> tuple[dict[str, Any] | None, float]:
    """(the holder recorded in a lock file or None if unreadable, seconds since its last heartbeat)."""
    try:
        age = time.time() - os.path.getmtime(path)
        with open(path, encoding="utf-8") as f:
            return json.load(f), age
    except FileNotFoundError:
        return None, 0.0
    except (OSError, ValueError):
        return None, age


# ----------------------------------------------------------------------------- what a resume may change
def _changeable(key: str) -> bool:
    return any(key == c or key.startswith(c + ".") for c in CHANGEABLE)


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: saved -> new' for every key of two resolved configs that differs and changes the run."""
    a, b = flatten_dict(dict(saved), sep="."), flatten_dict(dict(new), sep=".")
    return [f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}" for key in sorted(set(a) | set(b))
            if not _changeable(key) and a.get(key) != b.get(key)]


def file_identity(path: str) -> dict[str, Any]:
    """A data file's size and SHA-256 (of its first and last 16 MiB when over FULL_HASH_BYTES)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            digest.update(f.read())
    return {"path": os.path.abspath(path), "bytes": size, "sha256": digest.hexdigest(),
            "hashed": "all" if size <= FULL_HASH_BYTES else "first and last 16 MiB"}


def data_identity(sources: Mapping[str, Sequence[dict[str, Any]]], train_idx: np.ndarray, val_idx: np.ndarray
                  ) -> dict[str, Any]:
    """The run's data: {name: [file identities]} and the split's sizes and SHA-256."""
    split = hashlib.sha256(np.asarray(train_idx, np.int64).tobytes() + b"|" +
                           np.asarray(val_idx, np.int64).tobytes()).hexdigest()
    return {"sources": dict(sources), "split": {"train": len(train_idx), "val": len(val_idx), "sha256": split}}


def data_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two data identities (paths may differ: contents are compared)."""
    changes = []
    for name in sorted(set(saved["sources"]) | set(new["sources"])):
        old_files, new_files = saved["sources"].get(name, []), new["sources"].get(name, [])
        content = [(f["bytes"], f["sha256"]) for f in old_files], [(f["bytes"], f["sha256"]) for f in new_files]
        if content[0] != content[1]:
            def show(files: Sequence[dict[str, Any]]) -> str:
                return ", ".join(f"{os.path.basename(f['path'])} ({f['bytes']} B, {f['sha256'][:12]})"
                                 for f in files) or "(none)"
            changes.append(f"data {name}: {show(old_files)} -> {show(new_files)}")
    a, b = saved["split"], new["split"]
    if a != b:
        changes.append(f"train/validation split: {a['train']}/{a['val']} documents ({a['sha256'][:12]}) -> "
                       f"{b['train']}/{b['val']} ({b['sha256'][:12]})")
    return changes


def check_resume(run_dir: str, changes: list[str], allow: bool) -> str | None:
    """Refuse (ResumeChanged) a resume with `changes` unless `allow`; with it, the message saying what changed."""
    if not changes:
        return None
    listed = "\n".join(f"  {c}" for c in changes)
    if not allow:
        raise ResumeChanged(f"run_dir {run_dir} holds a run whose settings differ from this command's:\n{listed}\n"
                            f"Resume with the saved settings, train into another run_dir, or accept the "
                            f"changes with {ALLOW_KEY}")
    return f"resuming {run_dir} with changes ({ALLOW_KEY}):\n{listed}"


def read_data_identity(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, DATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_data_identity(run_dir: str, identity: Mapping[str, Any]) -> None:
    path = os.path.join(run_dir, DATA_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(identity, f, indent=1)
    os.replace(path + ".tmp", path)
