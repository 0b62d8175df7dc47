"""phi3jax's own throughput (no reference engine, no torch): forward, greedy decode and a training step.

What a jax version change costs shows here: run it once per environment, back to back on the same
machine, and compare (benchmarks/RESULTS.md, "jax versions"). Same config as bench_model.py and
bench_train.py (hidden 512, 8 layers, 8 heads of 64, vocab 32064, float32), on 2 threads:

    forward    4 x 512 tokens, tokens/s (median of --repeats)
    decode     greedy, batch 1, prompt 32, 128 new tokens, tokens/s; the per-layer parameters
               `phi3jax generate` / `chat` make at load, and the stacked ones as loaded
    train      one AdamW step on 4 x 512 tokens (forward, backward, clipping, update), tokens/s

    python benchmarks/bench_versions.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _measure import matmul_gflops, timeit  # noqa: E402

from phi3jax import forward, generate  # noqa: E402
from phi3jax.config import Phi3Config  # noqa: E402
from phi3jax.inference.generate import inference_params  # noqa: E402
from phi3jax.model import init_params  # noqa: E402
from phi3jax.train.step import OptimConfig, init_train_state, make_optimizer, train_step  # noqa: E402

CONFIG = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
              original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
QUICK = dict(CONFIG, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cfg = Phi3Config.from_hf(QUICK if args.quick else CONFIG)
    params = init_params(cfg, 0)
    rng = np.random.RandomState(0)
    out = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
           "threads": THREADS, "matmul_gflops": matmul_gflops()["jax"]}

    tokens = rng.randint(3, cfg.vocab_size, (4, 512))
    seconds = timeit(lambda: forward(params, cfg, tokens).block_until_ready(), args.repeats)
    out["forward_tokens_per_s"] = tokens.size / seconds

    prompt, new = rng.randint(3, cfg.vocab_size, (1, 32)), 128
    for name, p in (("decode_tokens_per_s", inference_params(params)), ("decode_stacked_tokens_per_s", params)):
        seconds = timeit(lambda p=p: generate(p, cfg, prompt, max_new_tokens=new, stop_tokens=[], chunk_size=new),
                         args.repeats)
        out[name] = new / seconds

    optimizer = make_optimizer(OptimConfig(warmup_steps=0), 1000)
    state = init_train_state(params, optimizer)
    batch_tokens = rng.randint(3, cfg.vocab_size, (4, 513)).astype(np.int32)
    batch = {"inputs": batch_tokens[:, :-1], "targets": batch_tokens[:, 1:], "loss_mask": np.ones((4, 512), np.float32),
             "segment_ids": np.ones((4, 512), np.int32), "positions": np.tile(np.arange(512, dtype=np.int32), (4, 1))}
    step = jax.jit(lambda s, b: train_step(s, b, cfg, optimizer), donate_argnums=(0,))
    holder = {"state": state}

    def one_step() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        metrics["loss"].block_until_ready()

    out["train_tokens_per_s"] = 4 * 512 / timeit(one_step, args.repeats)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
