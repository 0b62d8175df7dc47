"""Training: the config, the data pipeline, the loss and step, the train state on a mesh, checkpoints,
metrics and the loop. The command is `train.py` / `python -m phi3jax.train` (phi3jax.cli.train)."""
