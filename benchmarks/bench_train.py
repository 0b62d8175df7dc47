"""Training throughput of phi3jax against Hugging Face transformers + torch AdamW, side by side.

Same config, same float32 initial weights, same batch (4 x 512 tokens), same optimiser (AdamW,
global-norm clipping 1.0, weight decay 0.1), one process, torch limited to the thread count JAX
gets. One training step = forward, backward, clipping, AdamW update; the two are timed in turn,
step for step, so a shared machine's load falls on both alike. Also measures this machine's
float32 matmul peak in the same run, and reports phi3jax's MFU against it: model FLOPs per token
(6 N + 12 L H hd T, as the trainer logs it) x tokens/s / measured matmul FLOP/s.

    python benchmarks/bench_train.py            # the core benchmark's CPU config
    python benchmarks/bench_train.py --quick    # a smaller config, to check the script
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
from collections.abc import Callable

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _measure import interleaved_medians, matmul_gflops  # noqa: E402

from phi3jax import load_hf  # noqa: E402
from phi3jax.cli.process import reexec_with_memory_reuse  # noqa: E402
from phi3jax.train.metrics import train_flops_per_token  # noqa: E402
from phi3jax.train.step import OptimConfig, init_train_state, make_optimizer, train_step  # noqa: E402

torch.set_num_threads(THREADS)

CONFIG = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
              original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
QUICK = dict(CONFIG, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=8192, pad_token_id=0, eos_token_id=2)
OPTIM = OptimConfig(learning_rate=1e-4, warmup_steps=0, min_lr_ratio=1.0, b1=0.9, b2=0.95, eps=1e-8,
                    weight_decay=0.1, decay_embeddings=True, decay_norms=True, clip_norm=1.0)


def hf_train_step(model: torch.nn.Module, tokens: np.ndarray) -> tuple[Callable[[], None], list[float]]:
    decay = [p for n, p in model.named_parameters()]
    opt = torch.optim.AdamW(decay, lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    model.train()
    losses = []

    def step() -> None:
        out = model(input_ids=inputs)
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    return step, losses


def jax_train_step(params, cfg, tokens: np.ndarray) -> tuple[Callable[[], None], list[float]]:
    optimizer = make_optimizer(OPTIM, 1000)
    b, t = tokens.shape[0], tokens.shape[1] - 1
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
             "loss_mask": jnp.ones((b, t), jnp.float32), "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
    step_fn = jax.jit(functools.partial(train_step, cfg=cfg, optimizer=optimizer), donate_argnums=0)
    state = [init_train_state(params, optimizer)]
    losses = []

    def step() -> None:
        state[0], metrics = step_fn(state[0], batch)
        losses.append(float(metrics["loss"]))  # waits for the step

    return step, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small config, to check the script")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reexec_with_memory_reuse()  # as train.py and `phi3jax generate` do; both engines share the process
    config = QUICK if args.quick else CONFIG
    b, t = args.batch, args.seq_len

    with tempfile.TemporaryDirectory() as tmp:
        hf_config = transformers.Phi3Config(**config)
        torch.manual_seed(0)
        hf = transformers.Phi3ForCausalLM(hf_config)
        hf.save_pretrained(tmp)
        cfg, params = load_hf(tmp, dtype="float32")
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (b, t + 1))

    peak = matmul_gflops()
    jax_step, jax_losses = jax_train_step(params, cfg, tokens)
    hf_step, hf_losses = hf_train_step(hf, tokens)
    medians = interleaved_medians({"phi3jax": jax_step, "hf": hf_step}, args.repeats)
    jax_s, hf_s = medians["phi3jax"], medians["hf"]
    peak = {k: max(v, w) for (k, v), w in zip(peak.items(), matmul_gflops().values(), strict=True)}  # best of 2

    flops = train_flops_per_token(cfg, t) * b * t
    results = {
        "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "intermediate_size", "vocab_size")},
        "batch": [b, t], "threads": THREADS, "device": jax.devices()[0].device_kind,
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "phi3jax": {"step_s": round(jax_s, 3), "tokens_per_s": round(b * t / jax_s, 1),
                    "gflops": round(flops / jax_s / 1e9, 1), "mfu": round(flops / jax_s / 1e9 / peak["jax"], 3)},
        "hf_torch": {"step_s": round(hf_s, 3), "tokens_per_s": round(b * t / hf_s, 1),
                     "gflops": round(flops / hf_s / 1e9, 1), "mfu": round(flops / hf_s / 1e9 / peak["torch"], 3)},
        "speedup": round(hf_s / jax_s, 2),
        "first_losses": {"phi3jax": round(jax_losses[0], 4), "hf_torch": round(hf_losses[0], 4)},
    }
    print(json.dumps(results, indent=2))
    print()
    print("| | step (s) | tokens/s | GFLOP/s | MFU vs measured f32 matmul peak |")
    print("|---|---|---|---|---|")
    for name, key, pk in (("phi3jax (jit, optax AdamW)", "phi3jax", "jax"),
                          ("HF transformers + torch AdamW", "hf_torch", "torch")):
        r = results[key]
        print(f"| {name} | {r['step_s']} | {r['tokens_per_s']} | {r['gflops']} | {r['mfu']:.0%} "
              f"(peak {peak[pk]:.0f} GFLOP/s) |")
    print(f"\nphi3jax / HF training throughput: {results['speedup']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
