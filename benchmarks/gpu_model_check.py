"""The whole model on an accelerator with attention_impl=pallas against xla: logits, gradients, generation.

A Phi-3-mini-shaped model (hidden 3072, 32 heads of 96, vocab 32064) with fewer layers, random
bfloat16 weights. Prints one JSON object. Used by benchmarks/gpu_check.sh; `--small` runs a tiny
config anywhere (on CPU the kernels run interpreted).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax import Phi3Config, forward, generate, init_params
from phi3jax.train.step import loss_and_grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if args.small:
        cfg = Phi3Config.preset("tiny").replace(num_hidden_layers=2)
        batch, length, new = 2, 64, 8
    else:
        cfg = Phi3Config.preset("phi-3-mini-4k").replace(num_hidden_layers=args.layers)
        batch, length, new = 4, 2048, 64
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(cfg, 0)
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    out: dict = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                 "jax": jax.__version__, "layers": cfg.num_hidden_layers, "batch": batch, "length": length}

    logits = {}
    for impl in ("xla", "pallas"):
        c = cfg.replace(attention_impl=impl)
        logits[impl] = np.asarray(forward(params, c, tokens), np.float32)
        start = time.perf_counter()
        for _ in range(3):
            forward(params, c, tokens).block_until_ready()
        out[f"forward_ms_{impl}"] = 1e3 * (time.perf_counter() - start) / 3
    out["logits_max_abs_diff"] = float(np.abs(logits["xla"] - logits["pallas"]).max())
    out["logits_scale"] = float(np.abs(logits["xla"]).max())
    out["top1_agreement"] = float((logits["xla"].argmax(-1) == logits["pallas"].argmax(-1)).mean())

    batch_dict = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones_like(tokens, np.float32),
                  "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(length), (batch, 1))}
    grads = {}
    for impl in ("xla", "pallas"):
        c = cfg.replace(attention_impl=impl)
        step = jax.jit(loss_and_grads, static_argnums=1)
        loss, _, g = step(params, c, batch_dict)
        jax.block_until_ready(g)
        start = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(step(params, c, batch_dict))
        out[f"loss_{impl}"] = float(loss)
        out[f"fwd_bwd_ms_{impl}"] = 1e3 * (time.perf_counter() - start) / 3
        grads[impl] = g
    rel = [float(jnp.linalg.norm((a - b).astype(jnp.float32)) / (jnp.linalg.norm(a.astype(jnp.float32)) + 1e-30))
           for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["pallas"]), strict=True)]
    out["grad_max_relative_l2_diff"] = max(rel)

    prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (100, 37)]
    gens = {}
    for impl in ("xla", "pallas"):
        c = cfg.replace(attention_impl=impl)
        gens[impl] = generate(params, c, prompts, max_new_tokens=new, stop_tokens=[])
        start = time.perf_counter()
        generate(params, c, prompts, max_new_tokens=new, stop_tokens=[])
        out[f"decode_tokens_per_s_{impl}"] = len(prompts) * new / (time.perf_counter() - start)
    out["generate_same_tokens_fraction"] = float((gens["xla"].tokens == gens["pallas"].tokens).mean())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
