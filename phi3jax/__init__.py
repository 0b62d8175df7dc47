"""phi3jax: the Phi-3 family of language models in JAX/Flax."""

from phi3jax.config import ConfigError, Phi3Config
from phi3jax.convert.hf import load_hf, save_hf
from phi3jax.generate import generate  # the function; `phi3jax.generate` the module stays importable
from phi3jax.model import forward, init_params

__all__ = ["ConfigError", "Phi3Config", "forward", "generate", "init_params", "load_hf", "save_hf"]
