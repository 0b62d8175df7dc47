"""Ops layer: attention (a reference, named backends, one dispatcher) and the KV cache layout.

Imports only the parallel and base layers and `pallas_kernels` (which imports nothing from phi3jax).
"""

from phi3jax.ops.attention import Choice, attention, decode_attention, platform_of, select_backend
from phi3jax.ops.kv_cache import KVCache

__all__ = ["Choice", "KVCache", "attention", "decode_attention", "platform_of", "select_backend"]
