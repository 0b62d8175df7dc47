import sys

from phi3jax.cli.main import main

sys.argv.insert(1, "convert")  # `python -m phi3jax.convert ...` is `phi3jax convert ...`
sys.exit(main())
