"""The KV cache: one layout for every attention backend, defined here and nowhere else.

    k, v [layers, batch, kv_heads, max_len, head_dim]      (heads-major)

Heads-major keeps each head's keys and values contiguous, so a decoding query reads them in
place: the XLA reference's two matmuls (q.k over head_dim, p.v over positions) need no copy of
the cache, and the Pallas decode kernels tile [kv_heads, block, head_dim] straight from it.
The model writes each new token's keys and values at its row's own position (`write`); the
inference package allocates the cache (`KVCache.empty`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    k: jax.Array  # [layers, batch, kv_heads, max_len, head_dim]
    v: jax.Array  # [layers, batch, kv_heads, max_len, head_dim]

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: jnp.dtype
              ) -> KVCache:
        shape = (layers, batch, kv_heads, max_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: jax.Array | int, k_btkd: jax.Array, v_btkd: jax.Array, offset_b: jax.Array) -> KVCache:
        """Store new keys/values [B, T, KV, D] of `layer` at positions offset_b[b] ... of each row b
        (one in-place scatter per array)."""
        batch, length = k_btkd.shape[:2]
        rows_b1 = jnp.arange(batch)[:, None]
        cols_bt = offset_b[:, None] + jnp.arange(length)[None, :]
        # The advanced indices (rows, cols), split by a slice, put their [B, T] axes first: the
        # update keeps its [B, T, KV, D] order.
        index = (layer, rows_b1, slice(None), cols_bt)
        return KVCache(self.k.at[index].set(k_btkd.astype(self.k.dtype)),
                       self.v.at[index].set(v_btkd.astype(self.v.dtype)))

    def layer(self, layer: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """One layer's keys and values, [B, KV, S, D] each."""
        return (jax.lax.dynamic_index_in_dim(self.k, layer, axis=0, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, layer, axis=0, keepdims=False))
