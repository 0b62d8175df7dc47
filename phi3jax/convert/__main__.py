import sys

from phi3jax.convert.cli import main

sys.exit(main())
