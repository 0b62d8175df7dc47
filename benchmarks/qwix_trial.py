"""Trial of Google's qwix (LoRA / QLoRA by op interception) on phi3jax's linen Phi3, as is.

Answers, with code that runs (CPU, tiny preset, a few seconds of compute each):
  1. can qwix put adapters on qkv (or q / kv with GQA), o, gate_up and down, under nn.scan and
     without; which adapter leaves it creates; whether `.astype(x.dtype)` before the einsum hides
     the weight from it;
  2. whether q and kv (two einsums under GQA) can share one A, as PEFT's qkv_proj does;
  3. QLoRA (weight_qtype int8 / nf4): what the params tree holds, and how a float checkpoint gets in;
  4. a jitted train step (grads wrt the adapters + AdamW) against full fine-tuning, batch 4 x 128.

phi3jax is not modified: where qwix 0.1.8 fails on it, the error is printed verbatim and the trial
goes on with the smallest shim that gets past it (`_shims`), to see what comes next.

    python benchmarks/qwix_trial.py          # everything but peak RSS (about 4 minutes on two shared cores)
    python benchmarks/qwix_trial.py --rss    # also each timing case's peak RSS, in a subprocess of its own
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import warnings

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import qwix  # noqa: E402
from _measure import interleaved_medians  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from qwix._src.providers import lora as qwix_lora  # noqa: E402
from qwix._src.providers import ptq as qwix_ptq  # noqa: E402

from phi3jax.config import Phi3Config  # noqa: E402
from phi3jax.model import Phi3, init_params, stack_layers, unstack_layers  # noqa: E402

RANK, ALPHA = 16, 32.0
LORA_SUFFIXES = ("_lora_a", "_lora_b")
CAUGHT: list[str] = []  # warnings seen, verbatim


# ------------------------------------------------------------------------------------------ shims
# qwix 0.1.8 + flax 0.12.12. Each is the smallest change that gets past one failure.
_ORIG_SETATTR = getattr(qwix_lora, "setattr", setattr)
_ORIG_ASTYPE = qwix_ptq.WithAux.astype


def _setattr_unfrozen(obj, name, value):
    # LoraProvider.einsum stores `<weight>_lora_einsum_str` on the module "for debugging"; a linen
    # module is frozen outside setup(), so that raises for every compact module (flax's nn.Einsum too).
    object.__setattr__(obj, name, value)


def _withaux_astype(self, dtype):
    # WithAux.astype passes its QArray to flax_util.update_boxed, which accepts only arrays / boxes.
    try:
        return _ORIG_ASTYPE(self, dtype)
    except ValueError:
        return self.replace(array=self.array.astype(dtype))


@contextlib.contextmanager
def _shims(frozen_setattr: bool = True, strip_axes: bool = False, astype: bool = False):
    """frozen_setattr: see _setattr_unfrozen. strip_axes: drop phi3jax's logical-axis boxes, which qwix
    re-derives for the adapters from the weight's *consumed* shape (q is consumed as w[:, None]).
    astype: see _withaux_astype."""
    orig_wlp = nn.with_logical_partitioning
    if frozen_setattr:
        qwix_lora.setattr = _setattr_unfrozen
    if strip_axes:
        nn.with_logical_partitioning = lambda init, names, **kw: init
    if astype:
        qwix_ptq.WithAux.astype = _withaux_astype
    try:
        yield
    finally:
        qwix_lora.setattr = _ORIG_SETATTR
        nn.with_logical_partitioning = orig_wlp
        qwix_ptq.WithAux.astype = _ORIG_ASTYPE


def _err(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    if msg.endswith(":") and len(lines) > 1:  # jax's scan carry error says what differs on the next line
        msg += " " + lines[1]
    return f"{type(e).__name__}: {msg[:240]}"


# --------------------------------------------------------------------------------------- helpers
def tiny(kv_heads: int | None = None, **overrides) -> Phi3Config:
    if kv_heads is not None:
        overrides["num_key_value_heads"] = kv_heads
    return Phi3Config.preset("tiny", **overrides)


def batch(b: int, t: int, vocab: int) -> tuple[jax.Array, jax.Array]:
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, vocab, jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def lora_model(cfg: Phi3Config, scan: bool, qtype=None) -> nn.Module:
    provider = qwix.LoraProvider(module_path=r".*(attn|mlp)", rank=RANK, alpha=ALPHA, weight_qtype=qtype)
    return qwix.apply_lora_to_model(Phi3(cfg, scan_layers=scan), provider)


def init_lora(model: nn.Module, tokens, positions, jit: bool = True):
    init = jax.jit(model.init) if jit else model.init
    return nn.meta.unbox(init(jax.random.key(0), tokens, positions)["params"])


def describe(tree) -> dict:
    def leaf(x):
        if isinstance(x, qwix_ptq.WithAux):
            q = x.array
            return f"WithAux(qvalue {q.qvalue.dtype}{list(q.qvalue.shape)}, scale {q.scale.dtype}{list(q.scale.shape)})"
        return f"{x.dtype}{list(x.shape)}"

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, qwix_ptq.WithAux))


def split(params) -> tuple[dict, dict]:
    """(adapters, frozen base)."""
    flat = flatten_dict(params)
    train = {k: v for k, v in flat.items() if k[-1].endswith(LORA_SUFFIXES)}
    return unflatten_dict(train), unflatten_dict({k: v for k, v in flat.items() if k not in train})


def merge(*trees) -> dict:
    out = {}
    for t in trees:
        out.update(flatten_dict(t))
    return unflatten_dict(out)


def nbytes(tree) -> int:
    return sum(int(x.size) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def layer0(params) -> dict:
    return params["layers"] if "layers" in params else params["layers_0"]


# ------------------------------------------------------------------------------- 1. placement
def q1_placement() -> None:
    print(f"\n== 1. LoRA placement (rank {RANK}) ==")
    for kv in (2, 4):
        cfg = tiny(kv)
        tokens, positions = batch(1, 8, cfg.vocab_size)
        label = f"heads {cfg.num_attention_heads}, kv {kv}"
        for scan in (True, False):
            try:  # as shipped
                init_lora(lora_model(cfg, scan), tokens, positions)
                print(f"[{label}, scan={scan}] unshimmed: ok")
            except Exception as e:
                print(f"[{label}, scan={scan}] unshimmed: {_err(e)}")
            for strip in (False, True):
                try:
                    with _shims(strip_axes=strip):
                        p = init_lora(lora_model(cfg, scan), tokens, positions)
                    print(f"[{label}, scan={scan}] setattr shim{' + axes stripped' if strip else ''}: ok")
                    print("  " + json.dumps({k: v for k, v in describe(layer0(p)).items()
                                             if k in ("attn", "mlp")}))
                    break
                except Exception as e:
                    print(f"[{label}, scan={scan}] setattr shim{' + axes stripped' if strip else ''}: {_err(e)}")

    # Is every adapter applied? Perturb one B at a time and see the logits move. The parameter and
    # compute dtypes differ, so `.astype(x.dtype)` is a real convert between the weight and the einsum.
    print("\nadapter applied? (GQA tiny; B of one target set to 0.01, logits compared with B = 0)")
    for dtype, param_dtype in (("float32", "bfloat16"), ("bfloat16", "float32")):
        cfg = tiny(dtype=dtype, param_dtype=param_dtype)
        tokens, positions = batch(1, 8, cfg.vocab_size)
        # Eager with nn.scan is left out (scan traces its body anyway, so it behaves as jit=True), and
        # eager is run once only (it takes a minute).
        combos = ((True, True), (False, True)) + (((False, False),) if dtype == "float32" else ())
        for scan, jit in combos:
            label = f"  dtype {dtype}, param_dtype {param_dtype}, scan={scan}, jit={jit}:"
            with _shims(strip_axes=True):
                model = lora_model(cfg, scan)
                try:
                    p = init_lora(model, tokens, positions, jit=jit)
                except Exception as e:
                    print(label, "init", _err(e))
                    continue
                apply = jax.jit(model.apply) if jit else model.apply
                base = apply({"params": p}, tokens, positions)[0]
                found = {k[-1][: -len("_lora_b")] for k in flatten_dict(p) if k[-1].endswith("_lora_b")}
                moved = {}
                for target in ("q", "kv", "o", "gate_up", "down"):
                    if target not in found:
                        moved[target] = "no adapter"
                        continue
                    bumped = unflatten_dict({k: (v + 0.01 if k[-1] == f"{target}_lora_b" else v)
                                             for k, v in flatten_dict(p).items()})
                    out = apply({"params": bumped}, tokens, positions)[0]
                    moved[target] = bool(jnp.max(jnp.abs(out - base)) > 0)
            print(label, moved)


# ---------------------------------------------------------------------------- 2. shared A (GQA)
def q2_shared_a() -> None:
    print("\n== 2. GQA: one A for q, k, v (PEFT's qkv_proj)? ==")
    cfg = tiny()
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tokens, positions = batch(2, 16, cfg.vocab_size)
    with _shims(strip_axes=True):
        model = lora_model(cfg, scan=True)
        p = init_lora(model, tokens, positions)
    attn = {k: v.shape for k, v in p["layers"]["attn"].items() if k.endswith(LORA_SUFFIXES) and k[0] in "qk"}
    qwix_n = sum(int(np.prod(s[1:])) for s in attn.values())
    peft_n = RANK * d + RANK * (h + 2 * kv) * hd
    print(f"  qwix: {attn} (per layer {qwix_n} adapter params; PEFT qkv_proj: {peft_n})")
    print("  qwix keys adapters by (module, weight): q and kv are two weights, so two A's; k and v share")
    print("  kv_lora_a only because they are one stacked weight. No rule option ties adapters.")

    # User-side tying: train only q_lora_a and feed it as kv_lora_a too; the gradient is the sum.
    adapters, frozen = split(p)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # nonzero B, so A gets gradients
    attn = adapters["layers"]["attn"]
    adapters = merge(adapters, {"layers": {"attn": {"kv_lora_a": attn["q_lora_a"]}}})  # same point for both

    def loss(ad, tie):
        if tie:
            ad = merge(ad, {"layers": {"attn": {"kv_lora_a": ad["layers"]["attn"]["q_lora_a"]}}})
        logits = model.apply({"params": merge(frozen, ad)}, tokens, positions)[0]
        return jnp.mean(jnp.square(logits))

    with _shims(strip_axes=True):
        g_tied = jax.jit(jax.grad(lambda a: loss(a, True)))(adapters)
        g_free = jax.jit(jax.grad(lambda a: loss(a, False)))(adapters)
    ga, gf = g_tied["layers"]["attn"], g_free["layers"]["attn"]
    ok = np.allclose(ga["q_lora_a"], gf["q_lora_a"] + gf["kv_lora_a"], rtol=1e-4, atol=1e-7)
    print(f"  tying by hand in the loss (kv_lora_a := q_lora_a): grad(A) == grad_q(A) + grad_kv(A): {ok}")


# ------------------------------------------------------------------------------------ 3. QLoRA
def q3_qlora() -> None:
    print("\n== 3. QLoRA (weight_qtype) ==")
    tokens, positions = batch(2, 16, 2048)
    for kv in (2, 4):
        cfg = tiny(kv)
        for qtype in (jnp.int8, "nf4"):
            name = getattr(qtype, "__name__", qtype)
            label = f"[heads 4, kv {kv}, {name}]"
            for shims in ({}, {"astype": True}, {"astype": True, "strip_axes": True}):
                try:
                    with _shims(**shims):
                        model = lora_model(cfg, True, qtype)
                        p = init_lora(model, tokens, positions)
                        jax.jit(model.apply)({"params": p}, tokens, positions)
                    print(f"{label} shims {sorted(shims) or 'setattr only'}: init + apply ok")
                    break
                except Exception as e:
                    print(f"{label} shims {sorted(shims) or 'setattr only'}: {_err(e)}")
            else:
                continue
            if name != "int8":
                print("  mlp:", json.dumps(describe(p["layers"]["mlp"])))
            else:
                print("  layers:", json.dumps(describe(p["layers"])))
            adapters, frozen = split(p)
            fp_base = split(init_params(cfg))[1]
            print(f"  frozen base {nbytes(frozen) / 2**20:.2f} MiB (float32 base {nbytes(fp_base) / 2**20:.2f} MiB; "
                  f"uint4 counted at 1 B, as numpy stores it), adapters {nbytes(adapters) / 2**20:.2f} MiB")
            qtypes = {str(x.dtype) for x in jax.tree.leaves(p)}
            print(f"  leaf dtypes in the params tree: {sorted(qtypes)}")
            # A float checkpoint fed straight to the quantized model, and converted with quantize_params.
            fp = init_params(cfg)
            with _shims(astype=True):
                try:
                    model.apply({"params": merge(fp, adapters)}, tokens, positions)
                    print("  float base weights fed to apply: accepted")
                except Exception as e:
                    print(f"  float base weights fed to apply: {_err(e)}")
                what = "  qwix.quantize_params(stacked float params, scanned model's tree)"
                try:
                    qp = qwix.quantize_params(fp, p)
                    scale = qp["layers"]["mlp"]["down"].array.scale.shape
                    print(f"{what}: mlp/down scale {list(scale)} (init made [4, 1, 256])")
                    jax.jit(model.apply)({"params": merge(qp, adapters)}, tokens, positions)
                    print(f"{what}, then apply: ok")
                except Exception as e:
                    print(f"{what}, then apply: {_err(e)}")
                # Workaround: quantize per layer against the unscanned model's abstract tree, then stack.
                abstract = nn.meta.unbox(jax.eval_shape(lora_model(cfg, False, qtype).init, jax.random.key(0),
                                                        tokens, positions)["params"])
                qbase = stack_layers(qwix.quantize_params(unstack_layers(fp), abstract))
                out = jax.jit(model.apply)({"params": merge(qbase, adapters)}, tokens, positions)[0]
                ref = Phi3(cfg).apply({"params": fp}, tokens, positions)[0]
                rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                print(f"  per-layer quantize_params + stack_layers: ok; logits rel. error vs float {rel:.4f}")


# ----------------------------------------------------------------------------------- 4. timing
def _make_case(case: str, b: int, t: int):
    """A step closure for one case and the (trainable, frozen) byte counts."""
    kind, heads = case.rsplit("_", 1)
    cfg = tiny(2 if heads == "gqa" else 4)
    tokens, positions = batch(b, t, cfg.vocab_size)
    opt = optax.adamw(1e-4, weight_decay=0.1)
    shims = {"strip_axes": heads == "gqa", "astype": kind.startswith("qlora")}

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    if kind == "full":
        model = Phi3(cfg)
        trainable, frozen = init_params(cfg), {}
    else:
        qtype = {"lora": None, "qlora-int8": jnp.int8, "qlora-nf4": "nf4"}[kind]
        with _shims(**shims):
            model = lora_model(cfg, True, qtype)
            trainable, frozen = split(init_lora(model, tokens, positions))

    def loss_fn(tr, fr):
        return xent(model.apply({"params": merge(fr, tr)}, tokens, positions)[0])

    def step(tr, fr, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr)
        updates, opt_state = opt.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    with _shims(**shims):
        step_jit = jax.jit(step).lower(trainable, frozen, opt.init(trainable)).compile()
    state = {"tr": trainable, "opt": opt.init(trainable)}

    def run():
        state["tr"], state["opt"], loss = step_jit(state["tr"], frozen, state["opt"])
        loss.block_until_ready()

    return run, nbytes(trainable), nbytes(frozen)


CASES = ("full_gqa", "lora_gqa", "full_mha", "lora_mha", "qlora-int8_mha", "qlora-nf4_mha")


def q4_timing(b: int, t: int, repeats: int, rss: bool) -> None:
    print(f"\n== 4. jitted train step, batch {b} x {t}, AdamW, median of {repeats} (interleaved) ==")
    steps, sizes = {}, {}
    for case in CASES:
        try:
            steps[case], tr, fr = _make_case(case, b, t)
            sizes[case] = (tr, fr)
        except Exception as e:
            print(f"  {case}: {_err(e)}")
    medians = interleaved_medians(steps, repeats)
    peaks = {}
    if rss:
        for case in steps:
            out = subprocess.run([sys.executable, __file__, "--rss-case", case, "--batch", str(b), "--seq", str(t)],
                                 capture_output=True, text=True, timeout=300)
            peaks[case] = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "failed"
    for case, sec in medians.items():
        base = medians["full_" + case.rsplit("_", 1)[1]]
        tr, fr = sizes[case]
        print(f"  {case:16s} {sec * 1e3:7.1f} ms  x{sec / base:4.2f} of full FT  trainable {tr / 2**20:6.2f} MiB"
              f"  frozen {fr / 2**20:5.2f} MiB" + (f"  peak RSS {peaks[case]} MiB" if case in peaks else ""))


def _rss_case(case: str, b: int, t: int) -> None:
    run, _, _ = _make_case(case, b, t)
    for _ in range(2):
        run()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"{kib / 1024:.0f}")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rss", action="store_true", help="also each case's peak RSS (one subprocess each, ~2 min)")
    parser.add_argument("--rss-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_case:
        _rss_case(args.rss_case, args.batch, args.seq)
        return
    print(f"qwix {qwix.__version__}, jax {jax.__version__}, flax {__import__('flax').__version__}, "
          f"{jax.devices()[0].platform}")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for section in (q1_placement, q2_shared_a, q3_qlora,
                        lambda: q4_timing(args.batch, args.seq, args.repeats, args.rss)):
            start = time.perf_counter()
            section()
            print(f"  ({time.perf_counter() - start:.0f} s)")
    CAUGHT.extend(sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in seen}))
    print("\n== 5. warnings ==")
    print("\n".join("  " + w for w in CAUGHT) or "  none")


if __name__ == "__main__":
    main()
