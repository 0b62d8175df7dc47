import sys

from phi3jax.cli import main

sys.exit(main())
