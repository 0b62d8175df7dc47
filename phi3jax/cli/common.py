"""What several commands share: where a model comes from (--ckpt | --hf-dir [--adapter]) and loading it."""

from __future__ import annotations

import argparse
from typing import Any

from phi3jax.config import DTYPES


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--ckpt RUN_DIR_OR_STEP_DIR | --hf-dir DIR, shared by every command that loads a model."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ckpt", help="a run directory (its latest step) or a step directory")
    group.add_argument("--hf-dir", help="a Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--adapter", default=None,
                        help="with --hf-dir: a Hugging Face PEFT LoRA adapter directory to apply (merged on load)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="parameter/compute dtype (default: the checkpoint's)")


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(config, params, tokenizer) from --ckpt (a plain or a LoRA run: adapters merged) or --hf-dir
    (with --adapter: that PEFT adapter merged)."""
    from phi3jax.tokenizer import Tokenizer

    adapter = getattr(args, "adapter", None)
    if adapter and not args.hf_dir:
        raise SystemExit("--adapter applies to --hf-dir; a LoRA run directory (--ckpt) already names its base")
    if args.hf_dir:
        from phi3jax.convert.hf import load_hf

        if adapter:
            from phi3jax import lora as lora_lib
            from phi3jax.convert.peft import read_peft

            cfg, base = load_hf(args.hf_dir)  # merge adds A B in float32, then casts to `dtype`
            lora, adapters = read_peft(adapter, cfg)
            dtype = args.dtype or cfg.param_dtype
            params = lora_lib.merge(base, adapters, cfg, lora, dtype=dtype)
            return cfg.replace(dtype=dtype, param_dtype=dtype), params, Tokenizer.load(args.hf_dir)
        cfg, params = load_hf(args.hf_dir, dtype=args.dtype)
        return cfg, params, Tokenizer.load(args.hf_dir)
    from phi3jax.convert.lora import load_lora_run, run_lora
    from phi3jax.train.checkpoint import load_run, resolve_checkpoint

    if run_lora(resolve_checkpoint(args.ckpt)[0]) is not None:
        return load_lora_run(args.ckpt, dtype=args.dtype)
    return load_run(args.ckpt, dtype=args.dtype)
