"""`phi3jax eval perplexity|multiple-choice`: evaluation from the command line.

Data is read and checked before the model is loaded, so a bad file fails in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from phi3jax.cli.common import add_model_source, load_model


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model: perplexity, multiple choice",
                              description="Evaluate a model (see docs/evaluate.md).")
    tasks = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    ppl = tasks.add_parser("perplexity", help="perplexity on a text or JSONL file",
                           description="Perplexity on a .txt file (one document) or a .jsonl file (one "
                           "document per line). Each document is prefixed with BOS; every document token is "
                           "scored once, with sliding windows of --seq-len tokens moving by --stride.")
    add_model_source(ppl)
    ppl.add_argument("--data", required=True, help=".txt (one document) or .jsonl (one document per line)")
    ppl.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    ppl.add_argument("--seq-len", type=int, default=None,
                     help="window length (default: min(original_max_position_embeddings, 2048))")
    ppl.add_argument("--stride", type=int, default=None,
                     help="new tokens scored per window after the first (default: --seq-len, disjoint windows)")
    _add_common(ppl, default_batch=None)
    ppl.set_defaults(func=run_perplexity)

    mc = tasks.add_parser("multiple-choice", help="MMLU / HellaSwag accuracy by log-likelihood",
                          description="Multiple-choice accuracy (acc, acc_norm) scored as lm-evaluation-harness "
                          "does. MMLU: the release CSVs (data/ root, a test/ folder, or one CSV). HellaSwag: the "
                          "release JSONL.")
    add_model_source(mc)
    mc.add_argument("--task", required=True, choices=("mmlu", "hellaswag"))
    mc.add_argument("--data", required=True, help="MMLU: release root, split folder or CSV; HellaSwag: JSONL")
    mc.add_argument("--shots", type=int, default=0, help="K-shot examples in every prompt (default 0)")
    mc.add_argument("--split", default="test", choices=("test", "val", "dev"), help="MMLU split (default test)")
    mc.add_argument("--subjects", default=None, help="MMLU: comma-separated subjects (default: all found)")
    mc.add_argument("--fewshot-data", default=None, help="HellaSwag: JSONL the K-shot examples come from")
    mc.add_argument("--limit", type=int, default=None, help="score only the first N questions of each file")
    mc.add_argument("--max-length", type=int, default=None,
                    help="cut prompts from the left to this many tokens (default: max_position_embeddings)")
    _add_common(mc, default_batch=8)
    mc.set_defaults(func=run_multiple_choice)


def _add_common(p: argparse.ArgumentParser, default_batch: int | None) -> None:
    p.add_argument("--batch-size", type=int, default=default_batch,
                   help="rows per jitted batch" + ("" if default_batch else " (default: 8192 tokens' worth)"))
    p.add_argument("--no-bos", action="store_true", help="do not prefix the BOS token (default: prefix it)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


def _model_source(args: argparse.Namespace) -> dict[str, Any]:
    return {"ckpt": args.ckpt} if args.ckpt else {"hf_dir": args.hf_dir}


def run_perplexity(args: argparse.Namespace) -> int:
    from phi3jax.eval.perplexity import perplexity_of_texts, read_documents

    texts = read_documents(args.data, args.text_key)
    cfg, params, tokenizer = load_model(args)
    start = time.perf_counter()
    result = perplexity_of_texts(params, cfg, tokenizer, texts, add_bos=not args.no_bos, seq_len=args.seq_len,
                                 stride=args.stride, batch_size=args.batch_size,
                                 progress=False if args.no_progress else "perplexity")
    seconds = time.perf_counter() - start
    report = {"task": "perplexity", "model": _model_source(args), "data": args.data, **result.to_dict(),
              "seconds": seconds}
    print(f"documents      {result.documents}\n"
          f"tokens         {result.tokens}\n"
          f"mean NLL       {result.mean_nll:.6f} nats/token\n"
          f"perplexity     {result.perplexity:.4f}\n"
          f"bits per byte  {result.bits_per_byte:.4f}\n"
          f"windows        {result.windows} (seq_len {result.seq_len}, stride {result.stride})\n"
          f"BOS            {report['bos']['convention']}\n"
          f"time           {seconds:.1f}s ({result.tokens / seconds:.0f} tokens/s, compilation included)")
    _write_json(args.json, report)
    return 0


def run_multiple_choice(args: argparse.Namespace) -> int:
    from phi3jax.eval.multiple_choice import evaluate, format_table, load_task

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    items = load_task(args.task, args.data, shots=args.shots, limit=args.limit, subjects=subjects,
                      split=args.split, fewshot_data=args.fewshot_data)
    cfg, params, tokenizer = load_model(args)
    start = time.perf_counter()
    report = evaluate(params, cfg, tokenizer, items, add_bos=not args.no_bos, batch_size=args.batch_size,
                      max_length=args.max_length, progress=False if args.no_progress else args.task)
    seconds = time.perf_counter() - start
    report = {"task": args.task, "model": _model_source(args), "data": args.data, "shots": args.shots,
              **report, "seconds": seconds}
    print(f"{args.task}, {args.shots}-shot, {len(items)} questions, BOS: {report['bos']['convention']}")
    print(format_table(report))
    o = report["overall"]
    print(f"acc {o['acc']:.4f} ± {o['acc_stderr']:.4f}   acc_norm {o['acc_norm']:.4f} ± {o['acc_norm_stderr']:.4f}"
          f"   (macro acc over {len(report['groups'])} groups {report['macro']['acc']:.4f}); {seconds:.1f}s")
    _write_json(args.json, report)
    return 0
