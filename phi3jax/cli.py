"""The `phi3jax` command: one argparse dispatcher, one subcommand per user task.

Each subcommand lives next to the code it drives and registers itself through an
`add_cli(subparsers)` function listed in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

# "module:function" entries, each adding one subcommand. Order is the order of --help.
COMMANDS = (
    "phi3jax.chat:add_generate_cli",
    "phi3jax.chat:add_chat_cli",
    "eval.cli:add_eval_cli",
    "phi3jax.convert.cli:add_cli",
    "phi3jax.plan:add_cli",
)
# Subcommands that run the model on this machine: on a CPU host they reuse freed memory
# (phi3jax.host_memory). convert and plan only move or compile weights and keep glibc's defaults.
RUNS_MODEL = ("generate", "chat", "eval")


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--ckpt RUN_DIR_OR_STEP_DIR | --hf-dir DIR, shared by every command that loads a model."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ckpt", help="a run directory (its latest step) or a step directory")
    group.add_argument("--hf-dir", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="parameter/compute dtype (default: the checkpoint's)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(config, params, tokenizer) from --ckpt or --hf-dir."""
    from phi3jax.tokenizer import Tokenizer

    if args.hf_dir:
        from phi3jax.convert.hf import load_hf

        cfg, params = load_hf(args.hf_dir, dtype=args.dtype)
        return cfg, params, Tokenizer.load(args.hf_dir)
    from phi3jax.train.checkpoint import load_run

    return load_run(args.ckpt, dtype=args.dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi3jax", description="Phi-3 models in JAX: train, convert, "
                                     "evaluate, chat, export.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command in RUNS_MODEL:  # run as a program, not called from Python with arguments
        from phi3jax.host_memory import reexec_with_memory_reuse

        reexec_with_memory_reuse()  # may start this command over, before JAX's runtime starts
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"phi3jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
