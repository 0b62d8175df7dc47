"""Training metrics: FLOPs and MFU, and one logger writing stdout, metrics.jsonl, TensorBoard and loss.png.

metrics.jsonl holds one JSON object per logged step: `{"step", "split": "train", "loss",
"grad_norm", "lr", "tokens_per_s", "mfu", ...}` for training and `{"step", "split": "val",
"loss", "ppl"}` for validation. Losses are written with full precision (Python float repr of
the float32 value), so two runs can be compared bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax

from phi3jax.config import Phi3Config

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"

# Stated dense peak per chip, TFLOP/s, (bfloat16, float32) from the vendors' data sheets.
DEVICE_PEAK_TFLOPS = {
    "TPU v2": (45.0, None), "TPU v3": (123.0, None), "TPU v4": (275.0, None), "TPU v5 lite": (197.0, None),
    "TPU v5e": (197.0, None), "TPU v5p": (459.0, None), "TPU v5": (459.0, None), "TPU v6 lite": (918.0, None),
    "TPU v6e": (918.0, None), "TPU7x": (2307.0, None),
    "H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L4": (121.0, 30.3),
    "A10G": (70.0, 31.2), "V100": (125.0, 15.7), "T4": (65.0, 8.1),
}


def matmul_params(cfg: Phi3Config) -> int:
    """Parameters that take part in matmuls (the embedding lookup is a gather; a tied head is a matmul)."""
    embed = cfg.vocab_size * cfg.hidden_size
    return cfg.num_params() - embed + (embed if cfg.tie_word_embeddings else 0) - \
        cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)


def train_flops_per_token(cfg: Phi3Config, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward): 6 N + 12 L H hd T (PaLM's appendix B)."""
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params(cfg) + attention


def device_peak_flops(device: Any = None, dtype: str = "bfloat16") -> float | None:
    """The stated peak FLOP/s of a device for `dtype` compute, or None when unknown (CPUs)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            bf16, f32 = DEVICE_PEAK_TFLOPS[name]
            peak = f32 if dtype == "float32" else bf16
            if peak is None and dtype == "float32":
                peak = bf16  # TPUs run float32 matmuls on the MXU at bf16-pass rates; report against bf16
            return None if peak is None else peak * 1e12
    return None


class MetricsLogger:
    """Writes metrics on the primary process; every method is a no-op elsewhere."""

    def __init__(self, run_dir: str, *, total_steps: int, start_step: int, primary: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.run_dir, self.primary = run_dir, primary
        self._path = os.path.join(run_dir, METRICS_FILE)
        self._tb = None
        self._bar = None
        if not primary:
            return
        truncate_metrics(self._path, start_step)
        self._file = open(self._path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def print(self, message: str) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def advance(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log(self, step: int, split: str, metrics: dict[str, Any], echo: bool = True) -> None:
        if not self.primary:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"{split}/{key}", value, step)
        if echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if v is not None)
            self.print(f"[{split} step {step}] {shown}")

    def close(self) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._file.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop records after `last_step` (a resumed run logs those steps again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def plot_losses(run_dir: str) -> str | None:
    """loss.png: training loss per step and validation loss, from metrics.jsonl; a preference run
    (DPO) adds a second panel with rewards/accuracies and rewards/margins."""
    records = read_metrics(run_dir)

    def series(split: str, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), float)]

    train, val = series("train", "loss"), series("val", "loss")
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preference = any("rewards/margins" in r for r in records)
    fig, axes = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("preference loss (mean over pairs)" if preference else "loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if preference:
        ax = axes[0][1]
        for key in ("rewards/accuracies", "rewards/margins"):
            for split, style in (("train", "-"), ("val", "o-")):
                points = series(split, key)
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=f"{split} {key}", linewidth=1)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, PLOT_FILE)
    fig.savefig(path)
    plt.close(fig)
    return path
