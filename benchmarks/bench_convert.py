"""Conversion benchmark: a Phi-3-mini-shaped random bfloat16 checkpoint through
HF -> orbax -> HF -> GGUF q4_0, each step's wall time and peak resident memory against a plain copy
of the same bytes.

    python benchmarks/bench_convert.py                       # full size: 3.8B parameters, 7.6 GB
    python benchmarks/bench_convert.py --layers 4 --hidden 512 --intermediate 1024   # a quick check

Each step runs in its own Python process (calling the same functions `phi3jax convert` calls, so
the process can report on itself): "baseline" is that process's resident memory once phi3jax, jax,
orbax, tensorstore and gguf are imported, "peak" its maximum resident set during the step (the
kernel's VmHWM, reset when the step starts). The issue's bound is peak - baseline < 3 GiB, so a
3.8B model converts on a free Colab. Needs about 5x the checkpoint size of free disk under
--workdir. Exits 1 if a step breaks the bound or (with --verify) the round trip is not
bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
BOUND_GIB = 3.0


# ------------------------------------------------------------------------- one step, in a child
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS, so the peak is the step's own
    and not an import-time spike. Linux >= 4.0; False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    """Peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _run_step(step: str, src: str, out: str) -> dict:
    import gguf  # noqa: F401  (everything a step may import, so the baseline holds it)
    import jax
    import orbax.checkpoint  # noqa: F401
    import tensorstore  # noqa: F401

    from phi3jax.convert import gguf as phi3_gguf
    from phi3jax.convert import orbax as phi3_orbax

    jax.devices()  # the backend is part of the baseline too
    baseline = _rss()
    reset = _reset_peak()
    start = time.perf_counter()
    if step == "copy":
        os.makedirs(out)
        for name in sorted(os.listdir(src)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    elif step == "hf-to-orbax":
        phi3_orbax.hf_to_orbax(src, out)
    elif step == "orbax-to-hf":
        phi3_orbax.orbax_to_hf(src, out, dtype="bfloat16")
    elif step == "to-gguf-q4_0":
        phi3_gguf.to_gguf(out, hf_dir=src, quant="q4_0")
    else:
        raise ValueError(step)
    wall = time.perf_counter() - start
    return {"step": step, "wall_s": wall, "baseline_rss": baseline, "peak_rss": _peak(), "peak_reset": reset}


# ------------------------------------------------------------------------------------ driver
def _size(path: pathlib.Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_checkpoint(directory: pathlib.Path, cfg, seed: int = 0) -> None:
    """A random bfloat16 HF checkpoint of `cfg`'s shape, written tensor by tensor (no torch)."""
    import numpy as np

    from phi3jax.convert.files import write_json
    from phi3jax.convert.hf import write_hf_tensors
    from phi3jax.convert.keys import hf_shapes
    from phi3jax.convert.safetensors import NP_DTYPES

    rng = np.random.default_rng(seed)
    bf16 = NP_DTYPES["bfloat16"]

    def tensors():
        for name, shape in hf_shapes(cfg).items():
            if len(shape) == 1:
                yield name, np.ones(shape, bf16)
            else:
                yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    directory.mkdir(parents=True)
    config = cfg.to_hf_dict()
    config["torch_dtype"] = "bfloat16"
    write_json(str(directory / "config.json"), config)
    write_hf_tensors(tensors(), cfg, str(directory), bf16, max_shard_bytes=5 * 10**9, progress=True)
    vocab = REPO / "tests" / "data" / "phi3-vocab" / "tokenizer.model"
    if vocab.is_file() and cfg.vocab_size == 32064:
        shutil.copyfile(vocab, directory / "tokenizer.model")


def child(step: str, src: pathlib.Path, out: pathlib.Path) -> dict:
    cmd = [sys.executable, __file__, "--_step", step, str(src), str(out)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"step {step} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verify_round_trip(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Every tensor of two HF directories bit-identical, compared one tensor at a time."""
    from phi3jax.convert.safetensors import SafetensorsReader

    ra, rb = SafetensorsReader(str(a)), SafetensorsReader(str(b))
    if ra.names() != rb.names():
        return False
    for name in sorted(ra.names()):
        x, y = ra.get(name), rb.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            print(f"round trip differs at {name}", file=sys.stderr)
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi-3-mini-4k")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (a reduced-size run)")
    p.add_argument("--hidden", type=int, help="override hidden_size")
    p.add_argument("--intermediate", type=int, help="override intermediate_size")
    p.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--verify", action="store_true", help="check the HF -> orbax -> HF round trip is bit-identical")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_step", nargs=3, metavar=("STEP", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._step:
        print(json.dumps(_run_step(*args._step)))
        return 0

    sys.path.insert(0, str(REPO))
    from phi3jax.config import Phi3Config

    overrides = {k: v for k, v in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                                   ("intermediate_size", args.intermediate)) if v}
    cfg = Phi3Config.preset(args.preset, **overrides)
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    hf, run, hf2, gguf_file, copy = (work / n for n in ("hf", "run", "hf2", "model-q4_0.gguf", "copy"))
    for path in (hf, run, hf2, gguf_file, copy):
        if path.exists():
            raise SystemExit(f"{path} exists; use an empty --workdir")
    print(f"{cfg.num_params() / 1e9:.2f}B parameters ({args.preset}, {overrides or 'full size'}), work dir {work}")
    start = time.perf_counter()
    make_checkpoint(hf, cfg)
    print(f"random checkpoint written in {time.perf_counter() - start:.0f}s")

    results = [child("copy", hf, copy)]
    shutil.rmtree(copy)
    results.append(child("hf-to-orbax", hf, run))
    results.append(child("orbax-to-hf", run, hf2))
    results.append(child("to-gguf-q4_0", hf2, gguf_file))
    sizes = {"copy": _size(hf), "hf-to-orbax": _size(hf), "orbax-to-hf": _size(run / "checkpoints"),
             "to-gguf-q4_0": _size(hf2)}
    ok = True
    lines = ["| step | input | wall (s) | vs copy | baseline RSS | peak RSS | peak - baseline |",
             "|---|---|---|---|---|---|---|"]
    copy_s = results[0]["wall_s"]
    for r in results:
        above = (r["peak_rss"] - r["baseline_rss"]) / 2**30
        if r["step"] != "copy" and above >= BOUND_GIB:
            ok = False
        lines.append(f"| {r['step']} | {sizes[r['step']] / 1e9:.2f} GB | {r['wall_s']:.1f} | "
                     f"{r['wall_s'] / copy_s:.1f}x | {r['baseline_rss'] / 2**30:.2f} GiB | "
                     f"{r['peak_rss'] / 2**30:.2f} GiB | {above:.2f} GiB |")
    lines.append(f"\nGGUF q4_0: {_size(gguf_file) / 1e9:.2f} GB; orbax checkpoint: "
                 f"{_size(run / 'checkpoints') / 1e9:.2f} GB")
    if args.verify:
        same = verify_round_trip(hf, hf2)
        ok &= same
        lines.append(f"HF -> orbax -> HF bit-identical: {same}")
    print("\n".join(lines))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"config": overrides or args.preset, "results": results,
                                                       "sizes": sizes, "ok": ok}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("within the bound" if ok else f"FAILED: a step used {BOUND_GIB} GiB or more above its baseline"
          + ("" if not args.verify else " or the round trip differs"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
