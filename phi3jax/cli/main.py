"""The `phi3jax` command: one argparse dispatcher, one subcommand per user task.

Each subcommand lives in its own module of this package and registers itself through an
`add_cli(subparsers)` function; `COMMANDS` lists them in the order of --help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from phi3jax.cli import chat, convert, plan, process
from phi3jax.cli import eval as eval_cli

COMMANDS = (chat.add_generate_cli, chat.add_chat_cli, eval_cli.add_cli, convert.add_cli, plan.add_cli)
# Subcommands that run the model on this machine: on a CPU host they reuse freed memory
# (phi3jax.cli.process). convert and plan only move or compile weights and keep glibc's defaults.
RUNS_MODEL = ("generate", "chat", "eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3jax", description="Phi-3 models in JAX: train, convert, "
                                     "evaluate, chat, export.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_cli in COMMANDS:
        add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # run as a program, not called from Python with arguments
        process.prepare(reuse_memory=args.command in RUNS_MODEL)  # may start this command over
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"phi3jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
