"""Plain-JAX references for every kernel in this package (what the tests compare against).

Layouts follow the model: q [B, T, H, D], k and v [B, S, KV, D] with KV dividing H
(consecutive query heads share a kv head); a decode cache is heads-major, [B, KV, S, D].
Softmax in float32; probabilities are cast to v's dtype before the weighted sum, as Hugging
Face does.

The mask is defined once, here (`mask_from_indices`), and every blockwise implementation
(the CPU schedule, ring attention) builds its blocks' masks from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row gives a uniform distribution instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def mask_from_indices(q_idx: jax.Array, k_idx: jax.Array, *, q_segment_ids: jax.Array | None = None,
                      kv_segment_ids: jax.Array | None = None, causal: bool = True,
                      sliding_window: int | None = None) -> jax.Array:
    """Boolean [B or 1, Tq, Tk]: may the query at key index q_idx[b, t] attend to key k_idx[s]?

    q_idx: [B or 1, Tq] key-sequence indices of the queries; k_idx: [Tk] indices of the keys.
    Causal: keys at or before the query. Sliding window W: also keys after q_idx - W (W keys,
    the query's own included; Phi-3's convention). Segment ids [B, Tq] / [B, Tk]: only keys of
    the query's own segment (packed documents; padding gets a segment of its own).
    """
    q_bt1, k_11s = q_idx[:, :, None], k_idx[None, None, :]
    mask = jnp.ones((q_idx.shape[0], q_idx.shape[1], k_idx.shape[0]), dtype=bool)
    if causal:
        mask = mask & (k_11s <= q_bt1)
    if sliding_window is not None:
        mask = mask & (k_11s > q_bt1 - sliding_window)
    if q_segment_ids is not None:
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (q_segment_ids[:, :, None] == kv_seg[:, None, :])
    return mask


def reference_mask(q_len: int, kv_len: int, *, q_offset: jax.Array | None = None,
                   q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                   causal: bool = True, sliding_window: int | None = None) -> jax.Array:
    """Boolean [B or 1, T, S]: query t (at key index q_offset[b] + t) may attend to key s."""
    q_idx = jnp.arange(q_len)[None, :]
    if q_offset is not None:
        q_idx = q_idx + jnp.asarray(q_offset)[:, None]
    return mask_from_indices(q_idx, jnp.arange(kv_len), q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window)


def mha_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: jax.Array | None = None,
                  q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                  causal: bool = True, sliding_window: int | None = None,
                  sm_scale: float | None = None) -> jax.Array:
    """Reference for `flash_attention`: q [B,T,H,D], k/v [B,S,KV,D] -> [B,T,H,D] in v's dtype."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    q_btkgd = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k, preferred_element_type=jnp.float32) * scale
    mask = reference_mask(t, s, q_offset=q_offset, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, causal=causal, sliding_window=sliding_window)
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def decode_reference(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     sliding_window: int | None = None, sm_scale: float | None = None) -> jax.Array:
    """Reference for `decode_attention`: one query per row against a heads-major KV cache.

    q [B, H, D]; k_cache, v_cache [B, KV, S, D]; lengths [B]: row b attends to cache
    positions [max(0, lengths[b] - W), lengths[b]) (its own new key is the last of them).
    Each head's keys are read where they lie, with no copy of the cache.
    """
    b, h, d = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    q_bkgd = q.reshape(b, kv, h // kv, d)
    logits = jnp.einsum("bkgd,bksd->bkgs", q_bkgd, k_cache, preferred_element_type=jnp.float32) * scale
    mask = reference_mask(1, s, q_offset=jnp.asarray(lengths) - 1, causal=True, sliding_window=sliding_window)
    logits = jnp.where(mask[:, None], logits, MASK_VALUE)  # [B, 1, S] over the kv heads and groups
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v_cache).reshape(b, h, d)
