"""Apps layer: the `phi3jax` command (`phi3jax.cli.main`) and `train.py` (`phi3jax.cli.train`).

Process-level set-up (`phi3jax.cli.process`) lives here and only here.
"""
