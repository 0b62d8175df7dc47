"""Ops layer: attention (`phi3jax.ops.attention`: one reference, named backends, one dispatcher) and
the KV cache layout (`phi3jax.ops.kv_cache`).

Imports only the parallel and base layers and `pallas_kernels` (which imports nothing from phi3jax).
Nothing is re-exported here, so no function hides the module of the same name.
"""
