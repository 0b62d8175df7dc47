"""The `phi3jax` command: one argparse dispatcher, one subcommand per user task.

Each subcommand lives next to the code it drives and registers itself through an
`add_cli(subparsers)` function listed in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

# "module:function" entries, each adding one subcommand. Order is the order of --help.
COMMANDS = (
    "phi3jax.cli:add_generate_cli",
    "phi3jax.convert.cli:add_cli",
    "phi3jax.plan:add_cli",
)


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


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--seed", type=int, default=0)


def add_generate_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt", description="Generate text from a prompt.")
    add_model_source(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    add_sampling_args(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from phi3jax.generate import generate

    cfg, params, tok = load_model(args)
    if args.chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    stops = tuple(dict.fromkeys([*tok.stop_ids, *cfg.eos_token_id]))
    printed = ""
    generated: list[int] = []

    def stream(chunks: list[list[int]]) -> None:
        nonlocal printed
        generated.extend(t for t in chunks[0] if t not in stops)
        text = tok.decode(generated, skip_special=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text

    sys.stdout.write(args.prompt if not args.chat else "")
    start = time.perf_counter()
    out = generate(params, cfg, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops, callback=stream)
    seconds = time.perf_counter() - start
    n = int(out.lengths[0])
    print(f"\n[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tokens/s, compile included]", file=sys.stderr)
    return 0


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
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"phi3jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
