"""Training: the config system, the loop, checkpoints, metrics (entry point: `train.py` / `python -m phi3jax.train`)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """`train.py [--config X.yaml] [key=value ...]`."""
    from phi3jax.train.trainer import main as _main

    return _main(argv)
