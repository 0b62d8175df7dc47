import sys

from phi3jax.cli.train import main

sys.exit(main())
