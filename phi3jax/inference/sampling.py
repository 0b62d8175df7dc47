"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def greedy_tokens(logits_bv: jax.Array) -> jax.Array:
    """jnp.argmax over the vocabulary (first maximum; first NaN if any), as two plain reductions.

    A max then a min over the matching indices: XLA compiles argmax to a variadic (value, index)
    reduction, which on CPU runs ~7x slower (142 us against 22 us for one row of 32064 logits).
    """
    top = jnp.max(logits_bv, axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, logits_bv.ndim - 1)
    hits = (logits_bv == top) | jnp.isnan(logits_bv)
    return jnp.min(jnp.where(hits, ids, logits_bv.shape[-1]), axis=-1)


def sample_logits(logits_bv: jax.Array, rng: jax.Array, sampling: SamplingParams) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if sampling.temperature == 0.0:
        return greedy_tokens(logits_bv)
    logits = logits_bv / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
