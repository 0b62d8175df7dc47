import sys

from phi3jax.cli.main import main

sys.exit(main())
