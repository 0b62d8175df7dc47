"""The whole model on a GPU: attention_impl pallas and cudnn (and auto) against xla, for a training
step, prefill and decode. Prints one JSON object. Used by benchmarks/gpu_check.sh.

A Phi-3-mini-shaped model (hidden 3072, 32 heads of 96, vocab 32064) with --layers layers (4),
random bfloat16 weights:

    prefill      logits of 4 x 2048 tokens: max |diff| against xla, top-1 agreement, time
    train step   value and gradients of the mean next-token loss over 4 x 2048 tokens, unpacked
                 (what cuDNN takes) and packed into two documents a row (what our kernel takes):
                 relative L2 difference of every gradient against xla, time
    decode       greedy generation of 64 tokens for two prompts of different lengths: fraction of
                 tokens equal to xla's, tokens/s

`--small` runs a tiny config anywhere (on CPU the kernels run interpreted and cudnn is skipped).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax import Phi3Config, generate, init_params
from phi3jax.model import logits_fn
from phi3jax.ops.attention import platform_of, select_backend
from phi3jax.train.step import loss_and_grads


def timed(fn, repeats: int = 3) -> tuple[object, float]:
    """(fn's result, mean milliseconds of `repeats` more calls), after one warm-up call."""
    result = jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return result, 1e3 * (time.perf_counter() - start) / repeats


def relative_l2(a, b) -> float:
    return max(float(jnp.linalg.norm((x - y).astype(jnp.float32)) / (jnp.linalg.norm(y.astype(jnp.float32)) + 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


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
    platform = platform_of()
    impls = ["xla", "pallas", "auto"] + (["cudnn"] if platform == "gpu" else [])
    params = init_params(cfg, 0)
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    out: dict = {"platform": platform, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                 "layers": cfg.num_hidden_layers, "batch": batch, "length": length,
                 "auto_picks": {
                     "self": select_backend("auto", "self", platform=platform, dtype=jnp.bfloat16).backend,
                     "self_packed": select_backend("auto", "self", platform=platform, dtype=jnp.bfloat16,
                                                   has_segments=True).backend,
                     "decode": select_backend("auto", "decode", platform=platform).backend}}

    # prefill
    logits = {}
    for impl in impls:
        c = cfg.replace(attention_impl=impl)
        fn = jax.jit(lambda p, t, c=c: logits_fn(p, c, t))
        result, ms = timed(lambda fn=fn: fn(params, tokens))
        logits[impl] = np.asarray(result, np.float32)
        out[f"prefill_ms_{impl}"] = ms
    for impl in impls[1:]:
        out[f"prefill_max_abs_diff_{impl}"] = float(np.abs(logits[impl] - logits["xla"]).max())
        out[f"prefill_top1_agreement_{impl}"] = float((logits[impl].argmax(-1) == logits["xla"].argmax(-1)).mean())
    out["logits_scale"] = float(np.abs(logits["xla"]).max())

    # train step: unpacked rows (segment ids all one document) and packed rows (two documents)
    for packing, split in (("unpacked", length), ("packed", length // 3)):
        segments = np.where(np.arange(length) < split, 1, 2)[None].repeat(batch, 0).astype(np.int32)
        positions = np.where(segments == 1, np.arange(length), np.arange(length) - split).astype(np.int32)
        data = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones_like(tokens, np.float32),
                "segment_ids": segments, "positions": positions}
        if packing == "unpacked":  # no segment ids at all, so cuDNN can take it
            def loss(p, c, data=data):
                lg = logits_fn(p, c, data["inputs"])
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), data["targets"][..., None], -1))
            step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
        else:
            step = jax.jit(lambda p, c, data=data: loss_and_grads(p, c, data)[::2], static_argnums=1)
        grads = {}
        for impl in impls:
            c = cfg.replace(attention_impl=impl)
            (value, g), ms = timed(lambda step=step, c=c: step(params, c))
            out[f"train_{packing}_loss_{impl}"] = float(value)
            out[f"train_{packing}_ms_{impl}"] = ms
            grads[impl] = g
        for impl in impls[1:]:
            out[f"train_{packing}_grad_rel_l2_{impl}"] = relative_l2(grads[impl], grads["xla"])

    # decode
    prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (100, 37)]
    gens = {}
    for impl in impls:
        c = cfg.replace(attention_impl=impl)
        gens[impl] = generate(params, c, prompts, max_new_tokens=new, stop_tokens=[])
        start = time.perf_counter()
        generate(params, c, prompts, max_new_tokens=new, stop_tokens=[])
        out[f"decode_tokens_per_s_{impl}"] = len(prompts) * new / (time.perf_counter() - start)
    for impl in impls[1:]:
        out[f"decode_same_tokens_fraction_{impl}"] = float((gens[impl].tokens == gens["xla"].tokens).mean())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
