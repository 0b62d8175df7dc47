"""Metrics helpers: model FLOPs and MFU peaks, the metrics log on resume, and the count baselines."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest

from phi3jax.config import Phi3Config
from phi3jax.train import baselines, metrics


def test_train_flops_per_token_counts_every_matmul_three_times_over():
    cfg = Phi3Config.preset("tiny", vocab_size=2048)
    d, i, layers, h, kv, hd = 256, 688, 4, 4, 2, 64
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * i
    n = layers * per_layer + d * 2048  # the lm_head; the embedding lookup is no matmul
    assert metrics.matmul_params(cfg) == n
    assert metrics.train_flops_per_token(cfg, 256) == 6 * n + 12 * layers * h * hd * 256
    tied = cfg.replace(tie_word_embeddings=True)
    assert metrics.matmul_params(tied) == n  # the tied head is still a matmul


@pytest.mark.parametrize("kind, dtype, peak", [
    ("TPU v5 lite", "bfloat16", 197e12), ("TPU v4", "bfloat16", 275e12), ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", 67e12), ("cpu", "float32", None),
])
def test_device_peaks(kind, dtype, peak):
    assert metrics.device_peak_flops(types.SimpleNamespace(device_kind=kind), dtype) == peak


def test_resumed_runs_drop_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in range(1, 7)]
    path.write_text("\n".join(lines) + '\n{"step": 7, "spl')  # a line torn by a kill
    metrics.truncate_metrics(str(path), 4)
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_bigram_baseline_is_witten_bell_interpolation():
    v = 4
    tx = np.array([0, 0, 0, 1, 1, 2])
    ty = np.array([1, 1, 2, 0, 3, 3])
    vx, vy = np.array([0, 1, 3]), np.array([1, 2, 0])
    uni = (np.bincount(ty, minlength=v) + 1) / (len(ty) + v)
    # context 0: seen 3 times, 2 distinct followers; context 1: 2 times, 2 followers; context 3: unseen.
    p = [3 / 5 * 2 / 3 + 2 / 5 * uni[1], 2 / 4 * 0 + 2 / 4 * uni[2], uni[0]]
    assert baselines.bigram_cross_entropy(tx, ty, vx, vy, v) == pytest.approx(-np.mean(np.log(p)))
    assert baselines.unigram_cross_entropy(ty, vy, v) == pytest.approx(-np.mean(np.log(uni[vy])))
    assert math.isfinite(baselines.bigram_cross_entropy(tx, ty, np.array([3]), np.array([3]), v))
