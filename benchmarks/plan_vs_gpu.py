"""Check `phi3jax plan` against a real GPU: the compile's memory and a measured training step.

    python benchmarks/plan_vs_gpu.py [--preset phi-3-mini-4k] [--seq 4096] [--steps 3] [--out plan_vs_gpu.json]

On a machine with an NVIDIA GPU: compiles the sharded train step for the attached GPU (what
`phi3jax plan --target h100:1` does there), then creates the state sharded on a one-device
mesh, runs a few steps and reads the allocator's peak and the step time. Compare with the
CPU-compiled estimate `phi3jax plan --target h100:1` gives on a machine without a GPU
(71.0 GiB peak for Phi-3-mini, batch 1 x 4096, bf16 compute, fp32 AdamW, full remat).
Not yet run on a GPU: the session that wrote it could not send this branch to one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax import parallel
from phi3jax.cli import plan as plan_lib
from phi3jax.config import Phi3Config
from phi3jax.train import state as train_state
from phi3jax.train.step import OptimConfig, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="phi-3-mini-4k")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="plan_vs_gpu.json")
    args = ap.parse_args()
    overrides = dict(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    cfg = Phi3Config.preset(args.preset, **overrides)
    result: dict = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "preset": args.preset,
                    "batch": args.batch, "seq": args.seq, "num_params": cfg.num_params()}

    target = plan_lib.parse_target(f"h100:{len(jax.devices())}")
    inputs = plan_lib.PlanInputs(cfg, args.preset, {}, {})
    plan = plan_lib.make_plan(inputs, target, {"fsdp": -1}, args.batch, args.seq)
    result["plan"] = dataclasses.asdict(plan)
    print(plan_lib.format_plan(plan), flush=True)

    mesh = parallel.make_mesh({"fsdp": -1})
    optimizer = make_optimizer(OptimConfig(warmup_steps=0), 1000)
    t0 = time.perf_counter()
    state = train_state.sharded_init(cfg, mesh, optimizer, 0)
    jax.block_until_ready(state)
    result["init_seconds"] = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=(args.batch, args.seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((args.batch, args.seq), np.float32),
             "segment_ids": np.ones((args.batch, args.seq), np.int32),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    batch = parallel.put_batch(batch, mesh)
    step = train_state.make_train_step(cfg, mesh, optimizer)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    result.update(losses=losses, step_seconds=times, peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                  bytes_limit=stats.get("bytes_limit"))
    tok = args.batch * args.seq
    best = min(times[1:] or times)
    result["tokens_per_s"] = tok / best
    result["achieved_tflops"] = plan.flops_total / best / 1e12
    print(json.dumps({k: v for k, v in result.items() if k != "plan"}, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before anything else prints
    main()
