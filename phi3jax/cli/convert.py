"""`phi3jax convert`: hf-to-orbax, orbax-to-hf, to-gguf, and for LoRA runs lora-to-peft, peft-to-lora and
merge-lora (also `python -m phi3jax.convert`)."""

from __future__ import annotations

import argparse
from typing import Any

from phi3jax.config import DTYPES
from phi3jax.convert.gguf import QUANTS


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert", help="convert between HF, orbax run directories and GGUF",
        description="Convert checkpoints, streaming one tensor or layer at a time (peak memory stays near one "
                    "layer's size). Outputs are written under a temporary name and renamed when complete; an "
                    "existing output is replaced only with --force.")
    sub = p.add_subparsers(dest="convert_command", required=True, metavar="DIRECTION")

    h = sub.add_parser("hf-to-orbax", help="HF directory -> run directory (params, config, tokenizer)",
                       description="Write a run directory that `train.py init_from=ckpt:RUN_DIR` fine-tunes from and "
                                   "`phi3jax generate --ckpt` runs.")
    h.add_argument("--hf-dir", required=True, help="Hugging Face directory (config.json + *.safetensors)")
    h.add_argument("--out", required=True, help="the run directory to create")
    h.add_argument("--dtype", choices=DTYPES, default=None, help="dtype to store (default: the checkpoint's)")
    h.add_argument("--step", type=int, default=0, help="checkpoint step number to write (default 0)")
    _common(h)
    h.set_defaults(func=_run_hf_to_orbax)

    o = sub.add_parser("orbax-to-hf", help="run directory -> HF directory (safetensors, config, tokenizer)",
                       description="Write a directory that transformers' from_pretrained and AutoTokenizer load.")
    o.add_argument("--ckpt", required=True, help="a run directory (its latest step) or a step directory")
    o.add_argument("--out", required=True, help="the Hugging Face directory to create")
    o.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the safetensors (default bfloat16)")
    o.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard, GiB (default 2)")
    _common(o)
    o.set_defaults(func=_run_orbax_to_hf)

    g = sub.add_parser("to-gguf", help="run directory or HF directory -> GGUF file for llama.cpp",
                       description="Write a GGUF file (architecture phi3) that llama.cpp runs. q4_0 is what phones "
                                   "run (about 2.2 GB for Phi-3-mini); q8_0 is near-lossless.")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a run directory (its latest step) or a step directory")
    src.add_argument("--hf-dir", help="a Hugging Face directory")
    g.add_argument("--out", required=True, help="the .gguf file to create")
    g.add_argument("--quant", choices=QUANTS, default="f16",
                   help="weight type of the 2-D tensors (norms stay float32; default f16)")
    _common(g)
    g.set_defaults(func=_run_to_gguf)

    e = sub.add_parser("lora-to-peft", help="LoRA run -> Hugging Face PEFT adapter directory",
                       description="Write adapter_config.json + adapter_model.safetensors, which "
                                   "peft.PeftModel.from_pretrained(base_model, OUT) loads.")
    e.add_argument("--ckpt", required=True, help="a LoRA run directory (its latest step) or a step directory")
    e.add_argument("--out", required=True, help="the adapter directory to create")
    _common(e)
    e.set_defaults(func=_run_lora_to_peft)

    i = sub.add_parser("peft-to-lora", help="PEFT adapter + its HF base -> LoRA run directory",
                       description="Write a LoRA run directory (base: --hf-dir) that generate, chat, eval and "
                                   "merge-lora take, and that train.py continues with init_from=ckpt:OUT.")
    i.add_argument("--hf-dir", required=True, help="the base model's Hugging Face directory")
    i.add_argument("--adapter", required=True, help="the PEFT adapter directory")
    i.add_argument("--out", required=True, help="the run directory to create")
    _common(i)
    i.set_defaults(func=_run_peft_to_lora)

    m = sub.add_parser("merge-lora", help="LoRA run -> merged model (HF directory or GGUF file)",
                       description="Write the base with the adapters merged in (W + alpha/r * A B), streaming one "
                                   "tensor at a time, as a Hugging Face directory or a GGUF file for llama.cpp.")
    m.add_argument("--ckpt", required=True, help="a LoRA run directory (its latest step) or a step directory")
    m.add_argument("--out", required=True, help="the HF directory or .gguf file to create")
    m.add_argument("--format", choices=("hf", "gguf"), default="hf", help="output format (default hf)")
    m.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="hf: dtype of the safetensors")
    m.add_argument("--quant", choices=QUANTS, default="f16", help="gguf: weight type of the 2-D tensors")
    _common(m)
    m.set_defaults(func=_run_merge_lora)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output (only once the new one is done)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _run_hf_to_orbax(args: argparse.Namespace) -> int:
    from phi3jax.convert.orbax import hf_to_orbax

    cfg = hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, force=args.force, progress=args.progress,
                      step=args.step)
    print(f"wrote {args.out} ({_count(cfg.num_params())} parameters, {cfg.param_dtype}, step {args.step})")
    return 0


def _run_orbax_to_hf(args: argparse.Namespace) -> int:
    from phi3jax.convert.orbax import orbax_to_hf

    cfg = orbax_to_hf(args.ckpt, args.out, dtype=args.dtype, force=args.force,
                      max_shard_bytes=int(args.max_shard_gb * 2**30), progress=args.progress)
    print(f"wrote {args.out} ({_count(cfg.num_params())} parameters, {args.dtype})")
    return 0


def _run_to_gguf(args: argparse.Namespace) -> int:
    import os

    from phi3jax.convert.gguf import to_gguf

    path = to_gguf(args.out, ckpt=args.ckpt, hf_dir=args.hf_dir, quant=args.quant, force=args.force,
                   progress=args.progress)
    print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB, {args.quant})")
    return 0


def _run_lora_to_peft(args: argparse.Namespace) -> int:
    from phi3jax.convert.peft import lora_to_peft

    print(f"wrote {lora_to_peft(args.ckpt, args.out, force=args.force)}")
    return 0


def _run_peft_to_lora(args: argparse.Namespace) -> int:
    from phi3jax.convert.peft import peft_to_lora

    print(f"wrote {peft_to_lora(args.hf_dir, args.adapter, args.out, force=args.force)}")
    return 0


def _run_merge_lora(args: argparse.Namespace) -> int:
    from phi3jax.convert.lora import merge_lora

    path = merge_lora(args.ckpt, args.out, fmt=args.format, dtype=args.dtype, quant=args.quant, force=args.force,
                      progress=args.progress)
    print(f"wrote {path}")
    return 0
