"""Helpers shared by the training tests: a small corpus, a small model, fast configs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from phi3jax.train.config import TrainConfig, from_dict
from phi3jax.train.data import default_corpus

REPO = pathlib.Path(__file__).resolve().parent.parent

# Two layers, hidden 32, GQA 2:1 - compiles in seconds; the vocab follows the test tokenizer.
SMALL_MODEL = {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
               "original_max_position_embeddings": 128}


def write_corpus(directory: str | os.PathLike, n_docs: int = 24) -> str:
    """A few CPython doc topics as one text file per document; returns the directory."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for k, text in enumerate(default_corpus()[:n_docs]):
        (directory / f"doc{k:03d}.txt").write_text(text[:3000], encoding="utf-8")
    return str(directory)


def small_config(run_dir: str | os.PathLike, data_path: str | None, **overrides) -> TrainConfig:
    base = {
        "model": dict(SMALL_MODEL), "run_dir": str(run_dir), "steps": 12, "batch_size": 4, "seq_len": 64,
        "save_every": 4, "keep_checkpoints": 10, "seed": 0,
        "data": {"path": data_path, "vocab_size": 512, "val_fraction": 0.0},  # 264 specials and bytes + merges
        "optim": {"learning_rate": 3e-3, "warmup_steps": 2},
        "log": {"every": 1, "eval_every": 0, "progress_bar": False, "tensorboard": False, "plot": False,
                "baselines": False, "sample_prompt": ""},
    }
    for key, value in overrides.items():
        node = base
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(base)


def run_train_py(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300,
                 fault: str | None = None) -> subprocess.CompletedProcess:
    """train.py in a fresh process; with `fault` (tests/train_with_faults.py), the same run with that fault."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    program = [str(REPO / "train.py")] if fault is None else [str(REPO / "tests" / "train_with_faults.py"), fault]
    return subprocess.run([sys.executable, *program, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> str:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return str(path)
