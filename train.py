"""Train or fine-tune a Phi-3 model: `python train.py [--config configs/X.yaml] [key=value ...]`.

With no arguments it trains the tiny model on CPython's documentation on CPU (see docs/training.md).
"""

import sys

from phi3jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
