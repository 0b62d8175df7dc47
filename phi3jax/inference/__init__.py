"""Inference: generation (`phi3jax.inference.generate`: prefill, then a jitted decode loop over the
KV cache) and sampling (`phi3jax.inference.sampling`). `from phi3jax import generate` is the function."""
