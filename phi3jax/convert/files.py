"""Outputs that are either complete or absent: a directory built under a temporary name, JSON files,
and the progress bar every converter shows."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar counting tensors (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


class atomic_directory:
    """Build a directory under a temporary name; rename it into place only on success.

    An existing output is never touched unless overwrite=True, and then only after the new
    one is complete.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} already exists; choose another output or pass "
                                  "overwrite=True (--force on the command line)")
        self.tmp = ""

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        if os.path.exists(self.path):
            old = self.tmp + ".old"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)
