"""What several commands share: where a model comes from (--ckpt | --hf-dir) and loading it."""

from __future__ import annotations

import argparse
from typing import Any

from phi3jax.config import DTYPES


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--ckpt RUN_DIR_OR_STEP_DIR | --hf-dir DIR, shared by every command that loads a model."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ckpt", help="a run directory (its latest step) or a step directory")
    group.add_argument("--hf-dir", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
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
