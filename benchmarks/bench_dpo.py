"""DPO training step: phi3jax against TRL's DPOTrainer (trl 1.16, torch), side by side.

bench_train.py's CPU config (8 layers, hidden 512, vocab 32064; float32), the same initial weights
for the policy and for the frozen reference, the same pairs: 4 preference pairs of a 128-token
prompt and 128-token chosen and rejected completions (random token ids). One step = the policy's
forward over chosen and rejected, the reference's forward, the sigmoid DPO loss (beta 0.1), the
backward, global-norm clipping and AdamW. phi3jax packs each pair into one row of 512 positions;
TRL's collator pads the 8 sequences to 256. TRL's step is its own `compute_loss` on its own
collated batch, then torch AdamW. Timed in turn, step for step, in one process.

    python benchmarks/bench_dpo.py            # needs torch + trl (Python 3.11, the `hf` extra)
    python benchmarks/bench_dpo.py --quick    # a smaller config, to check the script
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _measure import interleaved_medians  # noqa: E402
from bench_train import CONFIG, OPTIM, QUICK  # noqa: E402

from phi3jax import load_hf  # noqa: E402
from phi3jax.cli.process import reexec_with_memory_reuse  # noqa: E402
from phi3jax.train import preference  # noqa: E402
from phi3jax.train.dpo import DpoConfig, dpo_train_step  # noqa: E402
from phi3jax.train.step import init_train_state, make_optimizer  # noqa: E402

torch.set_num_threads(THREADS)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETA = 0.1


def make_pairs(vocab: int, n: int, prompt: int, completion: int) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(0)
    ids = lambda k: rng.integers(3, min(vocab, 32000), k).tolist()  # noqa: E731  (no special tokens)
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(completion), "rejected_ids": ids(completion)}
            for _ in range(n)]


def jax_dpo_step(params, cfg, examples) -> tuple[Callable[[], None], list[float]]:
    pairs = []
    for i, ex in enumerate(examples):
        sides = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = np.asarray(ex["prompt_ids"] + ex[key], np.int32)
            sides.append((ids, np.r_[np.zeros(len(ex["prompt_ids"])), np.ones(len(ex[key]))].astype(np.float32)))
        pairs.append(preference.Pair(i, sides[0], sides[1]))
    seq = max(preference.pair_positions(p) for p in pairs)
    (batch,) = preference.eval_batches(pairs, seq_len=seq, batch_size=len(pairs))
    batch = {k: jax.numpy.asarray(v) for k, v in preference.with_reference(batch, None).items()}
    optimizer = make_optimizer(OPTIM, 1000)
    reference = jax.tree.map(lambda x: x.copy(), params)  # the frozen copy; the state's params are donated
    step_fn = jax.jit(functools.partial(dpo_train_step, cfg=cfg, optimizer=optimizer, dpo=DpoConfig(beta=BETA)),
                      donate_argnums=0)
    state = [init_train_state(params, optimizer)]
    losses = []

    def step() -> None:
        state[0], metrics = step_fn(state[0], batch, ref_params=reference)
        losses.append(float(metrics["loss"]))

    return step, losses


def trl_dpo_step(model, reference, tokenizer_dir: str, examples, tmp: str) -> tuple[Callable[[], None], list[float]]:
    import datasets
    from trl import DPOConfig, DPOTrainer

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    args = DPOConfig(output_dir=os.path.join(tmp, "trl"), beta=BETA, loss_type=["sigmoid"], report_to="none",
                     use_cpu=True, bf16=False, fp16=False, max_length=None,
                     per_device_train_batch_size=len(examples))
    dummy = datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dummy, processing_class=tok)
    batch = trainer.data_collator(examples)
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
                            weight_decay=OPTIM.weight_decay)
    model.train()
    losses = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_norm)
        opt.step()
        losses.append(float(loss))

    return step, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small config, to check the script")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reexec_with_memory_reuse()  # as train.py does
    from phi3jax.convert.hf_tokenizer import save_hf_tokenizer

    config = QUICK if args.quick else CONFIG
    examples = make_pairs(config["vocab_size"], args.pairs, args.prompt, args.completion)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**config))
        model.save_pretrained(tmp)
        reference = transformers.Phi3ForCausalLM.from_pretrained(tmp).eval()
        save_hf_tokenizer(os.path.join(REPO, "tests", "data", "phi3-vocab"), tmp)
        cfg, params = load_hf(tmp, dtype="float32")
        steps, losses = {}, {}
        steps["phi3jax"], losses["phi3jax"] = jax_dpo_step(params, cfg, examples)
        steps["trl"], losses["trl"] = trl_dpo_step(model, reference, tmp, examples, tmp)
        medians = interleaved_medians(steps, args.repeats)
    tokens = args.pairs * 2 * (args.prompt + args.completion)
    results = {
        "config": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
        "pairs": args.pairs, "prompt": args.prompt, "completion": args.completion, "threads": THREADS,
        "step_s": {k: round(v, 3) for k, v in medians.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in medians.items()},
        "phi3jax_vs_trl": round(medians["trl"] / medians["phi3jax"], 2),
        "first_losses": {k: round(v[0], 5) for k, v in losses.items()},
    }
    print(json.dumps(results, indent=2))
    print(f"\nDPO step, {args.pairs} pairs x 2 x {args.prompt + args.completion} tokens: phi3jax "
          f"{results['tokens_per_s']['phi3jax']} tokens/s, TRL {results['tokens_per_s']['trl']} tokens/s: "
          f"phi3jax / TRL = {results['phi3jax_vs_trl']}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
