import sys

from phi3jax.train import main

sys.exit(main())
