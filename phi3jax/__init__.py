"""phi3jax: the Phi-3 family of language models in JAX/Flax.

    from phi3jax import Phi3Config, load_hf, save_hf, forward, generate

The public names load lazily, on first use: `import phi3jax.tokenizer` (or any one module) does
not pull in JAX, Flax and the converters.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "ConfigError": "phi3jax.config",
    "Phi3Config": "phi3jax.config",
    "forward": "phi3jax.model",
    "init_params": "phi3jax.model",
    "generate": "phi3jax.inference.generate",
    "load_hf": "phi3jax.convert.hf",
    "save_hf": "phi3jax.convert.hf",
}

__all__ = ["ConfigError", "Phi3Config", "forward", "generate", "init_params", "load_hf", "save_hf"]

if TYPE_CHECKING:
    from phi3jax.config import ConfigError, Phi3Config
    from phi3jax.convert.hf import load_hf, save_hf
    from phi3jax.inference.generate import generate
    from phi3jax.model import forward, init_params


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'phi3jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
