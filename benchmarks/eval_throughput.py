"""Throughput of the eval and chat paths on a randomly initialised model of a preset's shape.

    python benchmarks/eval_throughput.py --preset phi-3-mini-4k --dtype bfloat16 --tokenizer tokenizer.model

Measures (each after a warm-up pass, so compilation is excluded; compile time reported apart):
  perplexity  tokens/s over documents of --ppl-doc-tokens tokens in --seq-len windows;
  mmlu        questions/s on a synthetic 5-shot MMLU set (4 subjects), four choices per question;
  chat        decode tokens/s of ChatSession turns (sampling, no stop: every turn runs to its limit).
Prints one JSON object (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phi3jax.cli.chat import ChatSession  # noqa: E402
from phi3jax.config import Phi3Config  # noqa: E402
from phi3jax.eval.multiple_choice import evaluate, load_mmlu  # noqa: E402
from phi3jax.eval.perplexity import perplexity  # noqa: E402
from phi3jax.model import init_params  # noqa: E402
from phi3jax.tokenizer import Tokenizer  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be or "
         "has had not but first one their its new after who they have two her she been other when "
         "there all during into school time may years more most only over city some world would where "
         "later up such used many can state about national out known university united then made").split()


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n)).capitalize()


def write_mmlu(root: str, subjects: int, questions: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("dev", 5), ("test", questions)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        for s in range(subjects):
            with open(os.path.join(root, split, f"subject_{s}_{split}.csv"), "w", newline="") as f:
                csv.writer(f).writerows([sentence(rng, int(rng.integers(12, 40))) + "?",
                                         *(sentence(rng, int(rng.integers(1, 8))) for _ in range(4)),
                                         "ABCD"[int(rng.integers(4))]] for _ in range(count))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ppl-docs", type=int, default=8)
    p.add_argument("--ppl-doc-tokens", type=int, default=4096)
    p.add_argument("--mmlu-questions", type=int, default=50)
    p.add_argument("--chat-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    tok = Tokenizer.load(args.tokenizer)
    cfg = Phi3Config.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    if cfg.vocab_size < tok.vocab_size:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    params, init_s = timed(lambda: jax.block_until_ready(init_params(cfg, 0)))
    report = {"device": str(jax.devices()[0].device_kind), "preset": args.preset, "dtype": args.dtype,
              "params": cfg.num_params(), "init_s": init_s}

    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 32000, args.ppl_doc_tokens).tolist() for _ in range(args.ppl_docs)]
    run = lambda: perplexity(params, cfg, docs, seq_len=args.seq_len, progress=False)  # noqa: E731
    _, first = timed(run)
    result, second = timed(run)
    print(json.dumps(report), flush=True)
    report["perplexity"] = {"tokens": result.tokens, "seq_len": args.seq_len, "windows": result.windows,
                            "first_s": first, "s": second, "tokens_per_s": result.tokens / second}

    print(json.dumps(report["perplexity"]), flush=True)
    with tempfile.TemporaryDirectory() as root:
        write_mmlu(root, subjects=4, questions=args.mmlu_questions)
        items = load_mmlu(root, shots=5)
    lengths = [len(tok.encode(i.context)) + 1 for i in items]
    run = lambda: evaluate(params, cfg, tok, items, progress=False)  # noqa: E731
    _, first = timed(run)
    mmlu, second = timed(run)
    report["mmlu"] = {"questions": len(items), "prompt_tokens_mean": float(np.mean(lengths)),
                      "prompt_tokens_max": int(max(lengths)), "first_s": first, "s": second,
                      "questions_per_s": len(items) / second, "acc": mmlu["overall"]["acc"]}

    print(json.dumps(report["mmlu"]), flush=True)
    session = ChatSession(params, cfg, tok, max_new_tokens=args.chat_tokens, temperature=0.8, top_p=0.95,
                          chunk_size=16)
    session.stops = (-1,)  # a random model: run every turn to max_new_tokens
    turns = [session.send(m, lambda _: None)[1] for m in ("Hello!", "Tell me more.", "And then?")]
    report["chat"] = [{"prompt_tokens": t.prompt_tokens, "new_tokens": t.new_tokens, "s": t.seconds,
                       "tokens_per_s": t.tokens_per_second, "compiled": t.compiled} for t in turns]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
