"""Count-based baselines a language model must beat, on the model's own tokens (nats per token).

* unigram: cross-entropy of the token frequencies of the train split (add-one smoothed);
* bigram: an interpolated bigram model fitted on the train split, Witten-Bell smoothing
  (P(b|a) = l_a c(a,b)/c(a) + (1 - l_a) P_uni(b), l_a = c(a) / (c(a) + distinct followers of a)),
  which needs no tuning on held-out data.
"""

from __future__ import annotations

import numpy as np


def unigram_probs(train_targets: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.bincount(np.asarray(train_targets, np.int64), minlength=vocab_size).astype(np.float64)
    return (counts + 1.0) / (counts.sum() + vocab_size)


def unigram_cross_entropy(train_targets: np.ndarray, val_targets: np.ndarray, vocab_size: int) -> float:
    p = unigram_probs(train_targets, vocab_size)
    return float(-np.mean(np.log(p[np.asarray(val_targets, np.int64)])))


def bigram_cross_entropy(train_inputs: np.ndarray, train_targets: np.ndarray, val_inputs: np.ndarray,
                         val_targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of val (input -> target) pairs under the Witten-Bell interpolated bigram of train."""
    v = np.int64(vocab_size)
    x, y = np.asarray(train_inputs, np.int64), np.asarray(train_targets, np.int64)
    keys, pair_counts = np.unique(x * v + y, return_counts=True)
    context_counts = np.bincount(x, minlength=vocab_size).astype(np.float64)
    followers = np.bincount(keys // v, minlength=vocab_size).astype(np.float64)
    uni = unigram_probs(y, vocab_size)

    vx, vy = np.asarray(val_inputs, np.int64), np.asarray(val_targets, np.int64)
    vkeys = vx * v + vy
    where = np.searchsorted(keys, vkeys)
    where = np.minimum(where, len(keys) - 1)
    c_ab = np.where(keys[where] == vkeys, pair_counts[where], 0).astype(np.float64)
    c_a, t_a = context_counts[vx], followers[vx]
    seen = c_a > 0
    lam = np.where(seen, c_a / np.maximum(c_a + t_a, 1.0), 0.0)
    p = lam * np.where(seen, c_ab / np.maximum(c_a, 1.0), 0.0) + (1.0 - lam) * uni[vy]
    return float(-np.mean(np.log(p)))
