"""`phi3jax eval perplexity|multiple-choice|preference`: evaluation from the command line.

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

    pref = tasks.add_parser("preference", help="DPO metrics of a policy against a reference on preference pairs",
                            description="TRL's DPO loss and reward metrics (rewards/chosen, rewards/rejected, "
                            "rewards/accuracies, rewards/margins, logps/chosen, logps/rejected) of a policy against "
                            "a reference on preference records (TRL's JSONL format; docs/preference.md). The two "
                            "models are loaded one after the other.")
    add_model_source(pref)
    ref = pref.add_mutually_exclusive_group()
    ref.add_argument("--ref-ckpt", help="the reference: a run directory or a step directory")
    ref.add_argument("--ref-hf-dir", help="the reference: a Hugging Face model directory")
    pref.add_argument("--data", required=True, help="preference JSONL: prompt, chosen, rejected per line")
    pref.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    pref.add_argument("--loss", default="sigmoid", help="sigmoid | ipo | hinge | robust | simpo (default sigmoid)")
    pref.add_argument("--label-smoothing", type=float, default=0.0, help="for sigmoid, robust, simpo (default 0)")
    pref.add_argument("--gamma", type=float, default=0.5, help="SimPO's target margin (default 0.5)")
    pref.add_argument("--seq-len", type=int, default=2048,
                      help="row length; a pair's two sequences share a row (default 2048)")
    pref.add_argument("--max-length", type=int, default=None,
                      help="tokens per sequence, prompt + completion (default: --seq-len // 2)")
    _add_common(pref, default_batch=8)
    pref.set_defaults(func=run_preference)


def _add_common(p: argparse.ArgumentParser, default_batch: int | None) -> None:
    p.add_argument("--batch-size", type=int, default=default_batch,
                   help="rows per jitted batch" + ("" if default_batch else " (default: 8192 tokens' worth)"))
    p.add_argument("--no-bos", action="store_true",
                   help="do not prefix the BOS token (default: prefix it); lm-evaluation-harness adds none for a "
                        "model whose tokenizer says add_bos_token false, as Phi-3's hub checkpoints do (the "
                        "report's bos field says which applies)")
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


def _bos_vs_hf(args: argparse.Namespace, add_bos: bool) -> dict[str, Any]:
    """Whether HF tooling prepends BOS for this model (lm-evaluation-harness's default: the
    HF directory itself, or a run's `phi3jax convert orbax-to-hf` export), and the flag that matches it."""
    from phi3jax.convert.hf_tokenizer import bos_convention
    from phi3jax.train.checkpoint import resolve_checkpoint

    adds, why = bos_convention(args.hf_dir or resolve_checkpoint(args.ckpt)[0])
    return {"model_adds_bos": adds, "model_adds_bos_from": why,
            "lm_eval_default": "BOS: reproduced without --no-bos" if adds else "no BOS: reproduced by --no-bos",
            "matches_lm_eval_default": adds == add_bos}


def _bos_line(bos: dict[str, Any]) -> str:
    same = "as" if bos["matches_lm_eval_default"] else "unlike"
    return f"{bos['convention']} ({same} lm-evaluation-harness's default for this model, {bos['lm_eval_default']})"


def run_perplexity(args: argparse.Namespace) -> int:
    from phi3jax.eval.perplexity import perplexity_of_texts, read_documents

    texts = read_documents(args.data, args.text_key)
    hf_bos = _bos_vs_hf(args, not args.no_bos)
    cfg, params, tokenizer = load_model(args)
    start = time.perf_counter()
    result = perplexity_of_texts(params, cfg, tokenizer, texts, add_bos=not args.no_bos, seq_len=args.seq_len,
                                 stride=args.stride, batch_size=args.batch_size,
                                 progress=False if args.no_progress else "perplexity")
    seconds = time.perf_counter() - start
    report = {"task": "perplexity", "model": _model_source(args), "data": args.data, **result.to_dict(),
              "seconds": seconds}
    report["bos"].update(hf_bos)
    print(f"documents      {result.documents}\n"
          f"tokens         {result.tokens}\n"
          f"mean NLL       {result.mean_nll:.6f} nats/token\n"
          f"perplexity     {result.perplexity:.4f}\n"
          f"bits per byte  {result.bits_per_byte:.4f}\n"
          f"windows        {result.windows} (seq_len {result.seq_len}, stride {result.stride})\n"
          f"BOS            {_bos_line(report['bos'])}\n"
          f"time           {seconds:.1f}s ({result.tokens / seconds:.0f} tokens/s, compilation included)")
    _write_json(args.json, report)
    return 0


def run_multiple_choice(args: argparse.Namespace) -> int:
    from phi3jax.eval.multiple_choice import evaluate, format_table, load_task

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    items = load_task(args.task, args.data, shots=args.shots, limit=args.limit, subjects=subjects,
                      split=args.split, fewshot_data=args.fewshot_data)
    hf_bos = _bos_vs_hf(args, not args.no_bos)
    cfg, params, tokenizer = load_model(args)
    start = time.perf_counter()
    report = evaluate(params, cfg, tokenizer, items, add_bos=not args.no_bos, batch_size=args.batch_size,
                      max_length=args.max_length, progress=False if args.no_progress else args.task)
    seconds = time.perf_counter() - start
    report = {"task": args.task, "model": _model_source(args), "data": args.data, "shots": args.shots,
              **report, "seconds": seconds}
    report["bos"].update(hf_bos)
    print(f"{args.task}, {args.shots}-shot, {len(items)} questions, BOS: {_bos_line(report['bos'])}")
    print(format_table(report))
    o = report["overall"]
    print(f"acc {o['acc']:.4f} ± {o['acc_stderr']:.4f}   acc_norm {o['acc_norm']:.4f} ± {o['acc_norm_stderr']:.4f}"
          f"   (macro acc over {len(report['groups'])} groups {report['macro']['acc']:.4f}); {seconds:.1f}s")
    _write_json(args.json, report)
    return 0


def run_preference(args: argparse.Namespace) -> int:
    from phi3jax.eval.preference import preference_report, score_pairs
    from phi3jax.train.dpo import METRICS, DpoConfig
    from phi3jax.train.preference import read_records, tokenize_records

    try:
        dpo = DpoConfig(beta=args.beta, loss=args.loss, label_smoothing=args.label_smoothing, gamma=args.gamma,
                        max_length=args.max_length)
    except ValueError as e:
        raise SystemExit(str(e).replace("dpo.", "--").replace("_", "-")) from None
    if dpo.uses_reference and not (args.ref_ckpt or args.ref_hf_dir):
        raise SystemExit(f"--loss {dpo.loss} compares against a reference: give --ref-ckpt RUN or --ref-hf-dir DIR "
                         "(only --loss simpo is reference-free)")
    records = read_records(args.data)
    cfg, params, tokenizer = load_model(args)
    limit = dpo.length_limit(args.seq_len)
    if 2 * (limit - 1) > args.seq_len:
        raise SystemExit(f"--max-length {limit}: a pair's two sequences share one row of --seq-len {args.seq_len}; "
                         f"use at most {args.seq_len // 2 + 1} or raise --seq-len")
    data = tokenize_records(records, tokenizer, max_length=limit, add_bos=not args.no_bos)
    progress = not args.no_progress
    start = time.perf_counter()
    policy, counts = score_pairs(params, cfg, data.pairs, seq_len=args.seq_len, batch_size=args.batch_size,
                                 progress=progress and "policy")
    del params
    reference = None
    if dpo.uses_reference:
        ref_args = argparse.Namespace(ckpt=args.ref_ckpt, hf_dir=args.ref_hf_dir, adapter=None, dtype=args.dtype)
        ref_cfg, ref_params, _ = load_model(ref_args)
        if ref_cfg.vocab_size != cfg.vocab_size:
            raise SystemExit(f"the reference has a vocabulary of {ref_cfg.vocab_size}, the policy {cfg.vocab_size}: "
                             "a reference must share the policy's tokenizer")
        reference, _ = score_pairs(ref_params, ref_cfg, data.pairs, seq_len=args.seq_len, batch_size=args.batch_size,
                                   progress=progress and "reference")
    seconds = time.perf_counter() - start
    report = {"task": "preference", "model": _model_source(args), "data": args.data,
              "reference": {"ckpt": args.ref_ckpt} if args.ref_ckpt else {"hf_dir": args.ref_hf_dir},
              "dpo": {"loss": dpo.loss, "beta": dpo.beta, "label_smoothing": dpo.label_smoothing, "gamma": dpo.gamma},
              "records": len(records), "truncated": data.truncated, "dropped": data.dropped,
              **preference_report(policy, reference, counts, dpo), "seconds": seconds}
    print(f"{report['pairs']} pairs of {len(records)} records ({data.describe(limit)}); loss {dpo.loss}, "
          f"beta {dpo.beta}")
    print(f"loss                {report['loss']:.6f}")
    for name in METRICS:
        print(f"{name:<20}{report[name]:.6f}")
    print(f"time                {seconds:.1f}s (compilation included)")
    _write_json(args.json, report)
    return 0
