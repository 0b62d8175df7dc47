"""Rotary position embeddings: default RoPE, LongRoPE, partial rotary.

Computed as Hugging Face computes them: inverse frequencies in float32, angles
`position * inv_freq` in float32, `emb = concat(freqs, freqs)` (rotate-half / NeoX
layout), cos and sin multiplied by the LongRoPE attention factor, then cast to the
activation dtype. Only the first `rotary_dim` channels of each head rotate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax.config import Phi3Config


def inv_frequencies(cfg: Phi3Config, long: bool) -> np.ndarray:
    """float32 inverse frequencies [rotary_dim // 2] (long or short LongRoPE factors)."""
    dim = cfg.rotary_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = np.float32(cfg.rope_theta) ** exponent
    if cfg.rope_type == "longrope":
        factors = cfg.rope_long_factor if long else cfg.rope_short_factor
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


def use_long_factors(cfg: Phi3Config, seq_len: jax.Array | int) -> jax.Array | bool:
    """HF's switch: long factors iff the sequence (max position id + 1 over the batch) exceeds
    `original_max_position_embeddings`. Always False for default RoPE."""
    if cfg.rope_type != "longrope":
        return False
    return seq_len > cfg.original_max_position_embeddings


def rope_tables(cfg: Phi3Config, positions_bt: jax.Array, long: jax.Array | bool,
                dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, rotary_dim] for integer positions [B, T]."""
    short_inv = jnp.asarray(inv_frequencies(cfg, long=False))
    if cfg.rope_type == "longrope":
        inv_freq = jnp.where(long, jnp.asarray(inv_frequencies(cfg, long=True)), short_inv)
    else:
        inv_freq = short_inv
    freqs_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb_btr = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    scale = cfg.rope_attention_scaling
    cos = jnp.cos(emb_btr) * scale
    sin = jnp.sin(emb_btr) * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_btnh: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim channels of each head (rotate-half convention)."""
    rotary_dim = cos_btr.shape[-1]
    x_rot, x_pass = x_btnh[..., :rotary_dim], x_btnh[..., rotary_dim:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_btr[:, :, None, :], sin_btr[:, :, None, :]
    x_rot = x_rot * cos + rotated * sin
    if x_pass.shape[-1] == 0:
        return x_rot
    return jnp.concatenate([x_rot, x_pass], axis=-1)
