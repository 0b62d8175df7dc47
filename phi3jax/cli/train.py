"""`train.py [--config X.yaml] [key=value ...]` (also `python -m phi3jax.train`): the training command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train or fine-tune a Phi-3 model. With no arguments: the tiny model on "
        "CPython's documentation, on CPU, in minutes.",
        epilog="Overrides: any config key, nested with dots, e.g. steps=500 optim.learning_rate=1e-3 "
        "model.preset=phi-3-mini-4k data.path=corpus/ init_from=hf:path/to/hf_dir")
    parser.add_argument("--config", help="a YAML config (default: the built-in tiny recipe, configs/tiny.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # run as a program, not called from Python with arguments
        from phi3jax.cli import process

        process.prepare()  # may start this command over, before JAX's runtime starts
    from phi3jax.train.config import load_config
    from phi3jax.train.loop import TrainingDiverged, train

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        result = train(cfg)
    except TrainingDiverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the steps (set-up, compilation, the final evaluation)
        print("\ntrain.py: interrupted (the checkpoints already saved are kept; rerun the same command to resume)",
              file=sys.stderr)
        return 130
    return 130 if result.status == "interrupted" else 0
