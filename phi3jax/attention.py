"""The attention entry point: one function, several implementations.

Every caller (the model, training, generation) goes through `attention`. The XLA path
here is the reference; custom kernels plug in behind the same signature and must match it.

Masking is described, not materialised by the caller:
  * `causal`: query i (at index `q_offset + i` of the key sequence) sees keys j <= its index;
  * `sliding_window` W: additionally only keys with index > query index - W (Phi-3's window:
    W keys, itself included);
  * segment ids: a query sees only keys of the same segment (packed documents; padding gets
    its own id so real tokens never attend to it).
GQA: query heads are grouped over kv heads (consecutive query heads share one kv head) with
an einsum, without repeating K and V in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row (padding) gives a uniform distribution instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_len: int, kv_len: int, *, q_offset_b: jax.Array | None = None,
                   q_segment_ids_bt: jax.Array | None = None, kv_segment_ids_bs: jax.Array | None = None,
                   causal: bool = True, sliding_window: int | None = None) -> jax.Array:
    """Boolean mask [B or 1, T, S]: True where query t may attend to key s."""
    q_idx = jnp.arange(q_len)[None, :]
    if q_offset_b is not None:
        q_idx = q_idx + q_offset_b[:, None]
    q_idx_bt1 = q_idx[:, :, None]
    kv_idx_11s = jnp.arange(kv_len)[None, None, :]
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        mask = mask & (kv_idx_11s <= q_idx_bt1)
    if sliding_window is not None:
        mask = mask & (kv_idx_11s > q_idx_bt1 - sliding_window)
    if q_segment_ids_bt is not None:
        kv_seg = q_segment_ids_bt if kv_segment_ids_bs is None else kv_segment_ids_bs
        mask = mask & (q_segment_ids_bt[:, :, None] == kv_seg[:, None, :])
    return mask


def xla_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *,
                  q_offset_b: jax.Array | None = None, q_segment_ids_bt: jax.Array | None = None,
                  kv_segment_ids_bs: jax.Array | None = None, causal: bool = True,
                  sliding_window: int | None = None) -> jax.Array:
    """Reference attention in plain XLA ops: float32 logits and softmax, GQA by einsum."""
    b, t, h, d = q_bthd.shape
    s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
    q_btkgd = q_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
    logits_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
    logits_bkgts = logits_bkgts * (d ** -0.5)
    mask_bts = attention_mask(t, s, q_offset_b=q_offset_b, q_segment_ids_bt=q_segment_ids_bt,
                              kv_segment_ids_bs=kv_segment_ids_bs, causal=causal,
                              sliding_window=sliding_window)
    logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, _MASK_VALUE)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskd.dtype)
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", probs_bkgts, v_bskd)
    return out_btkgd.reshape(b, t, h, d)


def resolve_impl(impl: str) -> str:
    """The implementation `impl` stands for on this backend."""
    if impl in ("auto", "xla"):
        return "xla"
    raise ValueError(
        f"attention_impl={impl!r} is not available in this build; use 'xla' (or 'auto').")


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *,
              q_offset_b: jax.Array | None = None, q_segment_ids_bt: jax.Array | None = None,
              kv_segment_ids_bs: jax.Array | None = None, causal: bool = True,
              sliding_window: int | None = None, impl: str = "auto") -> jax.Array:
    """Multi-head attention with GQA, causal / sliding-window / segment masking.

    q [B, T, H, D]; k, v [B, S, KV, D] with KV dividing H. `q_offset_b` [B] is the index
    of each row's first query in the key sequence (0 for self-attention over the same
    tokens, the cache position when decoding). Returns [B, T, H, D] in v's dtype.
    """
    if q_bthd.shape[2] % k_bskd.shape[2]:
        raise ValueError(f"{q_bthd.shape[2]} query heads cannot share {k_bskd.shape[2]} kv heads")
    resolve_impl(impl)
    if q_offset_b is None and kv_segment_ids_bs is None and q_bthd.shape[1] == k_bskd.shape[1]:
        # Under a mesh that splits sequences (phi3jax.sharding, mesh.sequence > 1), self-attention
        # runs as ring attention so no device ever holds a whole sequence's keys.
        from phi3jax import ring_attention as ring

        mesh = ring.sequence_parallel_mesh()
        if mesh is not None:
            return ring.ring_attention(q_bthd, k_bskd, v_bskd, segment_ids_bt=q_segment_ids_bt, causal=causal,
                                       sliding_window=sliding_window, mesh=mesh)
    return xla_attention(q_bthd, k_bskd, v_bskd, q_offset_b=q_offset_b,
                         q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs,
                         causal=causal, sliding_window=sliding_window)
