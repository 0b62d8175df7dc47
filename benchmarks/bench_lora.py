"""LoRA training step: phi3jax LoRA against phi3jax full fine-tuning and Hugging Face transformers + PEFT.

bench_train.py's CPU config (8 layers, hidden 512, vocab 32064; float32), batch 4 x 512 tokens,
LoRA rank 16 (alpha 32) on all four projections (qkv, o, gate_up, down), AdamW on what is trained.
One step = forward, backward, clipping, AdamW. The three are timed in turn, step for step, in one
process (a shared machine's load falls on all alike). Peak host memory: each case again in a fresh
process of its own: resident memory sampled every 5 ms over 3 steps, reported as the peak and as
what the steps add to the process as set up (model built and loaded, both frameworks imported).

    python benchmarks/bench_lora.py            # needs torch + peft (Python 3.11, the `hf` extra)
    python benchmarks/bench_lora.py --quick    # a smaller config, to check the script
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _measure import interleaved_medians  # noqa: E402
from bench_train import CONFIG, OPTIM, QUICK, hf_train_step, jax_train_step  # noqa: E402

from phi3jax import load_hf  # noqa: E402
from phi3jax import lora as lora_lib  # noqa: E402
from phi3jax.cli.process import reexec_with_memory_reuse  # noqa: E402
from phi3jax.config import LoraConfig  # noqa: E402
from phi3jax.train.step import init_train_state, make_optimizer, train_step  # noqa: E402

torch.set_num_threads(THREADS)
RANK, ALPHA = 16, 32
LORA = LoraConfig(rank=RANK, alpha=ALPHA, targets=("qkv", "o", "gate_up", "down"), base_dtype="float32")
CASES = ("phi3jax_lora", "phi3jax_full", "hf_peft_lora")


def _batch(tokens: np.ndarray) -> dict[str, jax.Array]:
    b, t = tokens.shape[0], tokens.shape[1] - 1
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "loss_mask": jnp.ones((b, t), jnp.float32), "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def jax_lora_step(params, cfg, tokens: np.ndarray) -> tuple[Callable[[], None], list[float]]:
    optimizer = make_optimizer(OPTIM, 1000)
    batch = _batch(tokens)
    frozen = jax.tree.map(jnp.copy, lora_lib.quantize_base(params, cfg, LORA))  # full FT donates `params`
    step_fn = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=optimizer, lora=LORA), donate_argnums=0)
    state = [init_train_state(lora_lib.init_adapters(cfg, LORA, 0), optimizer)]
    losses = []

    def step() -> None:
        state[0], metrics = step_fn(state[0], batch, frozen=frozen)
        losses.append(float(metrics["loss"]))

    return step, losses


def hf_peft_step(model: torch.nn.Module, tokens: np.ndarray) -> tuple[Callable[[], None], list[float]]:
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    return hf_train_step(model, tokens)  # AdamW over the parameters that require grad: the adapters


def _setup(config: dict, tmp: str):
    hf_config = transformers.Phi3Config(**config)
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(hf_config)
    hf.save_pretrained(tmp)
    cfg, params = load_hf(tmp, dtype="float32")
    return hf, cfg, params


def _steps(case: str, hf, cfg, params, tokens) -> tuple[Callable[[], None], list[float]]:
    if case == "phi3jax_lora":
        return jax_lora_step(params, cfg, tokens)
    if case == "phi3jax_full":
        return jax_train_step(params, cfg, tokens)
    return hf_peft_step(hf, tokens)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss(case: str, quick: bool, batch: int, seq: int) -> dict[str, float]:
    """Peak resident MiB of `case` alone in a fresh process, and what its steps add."""
    out = subprocess.run([sys.executable, __file__, "--only", case, "--batch", str(batch), "--seq-len", str(seq)]
                         + (["--quick"] if quick else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small config, to check the script")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=CASES, help="run one case for 3 steps and print its peak RSS (internal)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reexec_with_memory_reuse()  # as train.py does
    config = QUICK if args.quick else CONFIG
    b, t = args.batch, args.seq_len
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (b, t + 1))
    with tempfile.TemporaryDirectory() as tmp:
        hf, cfg, params = _setup(config, tmp)

    if args.only:
        if args.only != "hf_peft_lora":
            del hf
        else:
            del params
        before = _rss_mib()
        samples = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                samples.append(_rss_mib())

        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        step, _ = _steps(args.only, hf if args.only == "hf_peft_lora" else None, cfg, params if
                         args.only != "hf_peft_lora" else None, tokens)
        for _ in range(3):
            step()
        done.set()
        watcher.join()
        print(json.dumps({"peak_rss_mib": round(max(samples), 1), "added_mib": round(max(samples) - before, 1)}))
        return

    steps, losses = {}, {}
    for case in CASES:
        steps[case], losses[case] = _steps(case, hf, cfg, params, tokens)
    medians = interleaved_medians(steps, args.repeats)
    trained = {"phi3jax_lora": lora_lib.count(lora_lib.abstract_adapters(cfg, LORA)),
               "phi3jax_full": lora_lib.count(params),
               "hf_peft_lora": sum(p.numel() for p in hf.parameters() if p.requires_grad)}
    rss = {case: _peak_rss(case, args.quick, b, t) for case in CASES}
    results = {
        "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
        "batch": [b, t], "threads": THREADS, "lora": {"rank": RANK, "alpha": ALPHA, "targets": list(LORA.targets)},
        "step_s": {k: round(v, 3) for k, v in medians.items()},
        "tokens_per_s": {k: round(b * t / v, 1) for k, v in medians.items()},
        "trained_params": trained, "peak_rss_mib": rss,
        "lora_vs_full": round(medians["phi3jax_full"] / medians["phi3jax_lora"], 2),
        "lora_vs_hf_peft": round(medians["hf_peft_lora"] / medians["phi3jax_lora"], 2),
        "first_losses": {k: round(v[0], 4) for k, v in losses.items()},
    }
    print(json.dumps(results, indent=2))
    print()
    print("| | step (s) | tokens/s | trained params | peak RSS, MiB (own process) | added by the steps, MiB |")
    print("|---|---|---|---|---|---|")
    names = {"phi3jax_lora": "phi3jax LoRA r16", "phi3jax_full": "phi3jax full fine-tuning",
             "hf_peft_lora": "HF transformers + PEFT LoRA r16"}
    for case in CASES:
        print(f"| {names[case]} | {results['step_s'][case]} | {results['tokens_per_s'][case]} | "
              f"{trained[case]:,} | {rss[case]['peak_rss_mib']:.0f} | {rss[case]['added_mib']:.0f} |")
    print(f"\nphi3jax LoRA vs phi3jax full fine-tuning: {results['lora_vs_full']}x faster; "
          f"vs HF + PEFT LoRA: {results['lora_vs_hf_peft']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
