"""Forward and greedy-decode throughput of phi3jax against Hugging Face transformers, side by side.

Same config, same float32 weights, same tokens, one process, torch limited to the same thread
count JAX gets. Also measures this machine's limits in the same run: float32 matmul GFLOP/s
and memory bandwidth (decode of a float32 model is bounded by bandwidth / weight bytes read per
token). Greedy decode is also timed in llama.cpp (llama-cpp-python, a dev dependency) on the same
weights exported to a float32 GGUF (with the Phi-3 tokenizer the tests carry, tests/data/phi3-vocab).
And the jit compile time of a 32-layer model against a 4-layer one (nn.scan keeps it flat).

    python benchmarks/bench_model.py            # the issue's CPU config
    python benchmarks/bench_model.py --quick    # a smaller config, to check the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _measure import interleaved_medians, matmul_gflops, timeit  # noqa: E402

from phi3jax import forward, generate, load_hf  # noqa: E402
from phi3jax.config import Phi3Config  # noqa: E402
from phi3jax.convert.gguf import to_gguf  # noqa: E402
from phi3jax.inference.generate import inference_params  # noqa: E402
from phi3jax.model import init_params, logits_fn  # noqa: E402

try:
    import llama_cpp  # noqa: E402
except ImportError:  # the dev extra installs it
    llama_cpp = None

torch.set_num_threads(THREADS)

CONFIG = dict(vocab_size=32064, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
              original_max_position_embeddings=4096, pad_token_id=32000, bos_token_id=1, eos_token_id=32000)
PHI3_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "phi3-vocab" / "tokenizer.model"
QUICK = dict(CONFIG, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4)


def bandwidth_gbs(n_bytes: int = 512 * 2**20) -> float:
    """Read + write bandwidth of a large copy (bytes moved / time), the best of torch and numpy."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), 5)
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    t2 = timeit(lambda: np.copyto(b, a), 5)
    return 2 * n_bytes / min(t, t2) / 1e9


def build(directory: str, config: dict) -> tuple:
    hf_config = transformers.Phi3Config(**config)
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(hf_config).eval()
    hf.save_pretrained(directory)
    cfg, params = load_hf(directory)
    return hf, cfg, params


def bench_forward(hf, cfg, params, batch: int, length: int, repeats: int) -> dict:
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    tt = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        ref = hf(tt).logits.numpy()
    ours = np.asarray(forward(params, cfg, tokens))
    max_diff = float(np.abs(ours - ref).max())

    def hf_run():
        with torch.no_grad():
            hf(tt)

    medians = interleaved_medians({"hf": hf_run, "phi3jax": lambda: forward(params, cfg, tokens).block_until_ready()},
                                  repeats)
    hf_s, jax_s = medians["hf"], medians["phi3jax"]
    n = batch * length
    return {"hf_tokens_per_s": n / hf_s, "phi3jax_tokens_per_s": n / jax_s, "speedup": hf_s / jax_s,
            "max_abs_logit_diff": max_diff}


def llama_cpp_greedy(directory: str, prompt: list[int], new_tokens: int) -> Callable[[], list[int]] | None:
    """Greedy decode in llama.cpp of the HF checkpoint in `directory` (exported to a float32 GGUF with a
    float32 KV cache, as phi3jax and HF compute), or None when llama.cpp or the tokenizer is missing."""
    if llama_cpp is None or not PHI3_TOKENIZER.is_file():
        return None
    shutil.copyfile(PHI3_TOKENIZER, os.path.join(directory, "tokenizer.model"))
    path = to_gguf(os.path.join(directory, "model-f32.gguf"), hf_dir=directory, quant="f32")
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new_tokens, n_batch=len(prompt), type_k=f32,
                          type_v=f32, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)

    # llm.generate yields tokens without end (it does not stop at EOS); take exactly new_tokens.
    return lambda: list(itertools.islice(llm.generate(prompt, temp=0.0, top_k=1, reset=True), new_tokens))


def bench_decode(hf, cfg, params, directory: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    prompt = np.random.RandomState(1).randint(3, cfg.vocab_size, (1, prompt_len))
    tt = torch.as_tensor(prompt, dtype=torch.long)

    def hf_run():
        with torch.no_grad():
            return hf.generate(tt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=cfg.pad_token_id)

    hf_tokens = hf_run()[0, prompt_len:].numpy()
    params = inference_params(params)  # made once, as `phi3jax generate` / `chat` do at load

    def ours_run():
        return generate(params, cfg, prompt, max_new_tokens=new_tokens, stop_tokens=[], chunk_size=new_tokens)

    ours_tokens = ours_run().tokens[0]
    runs = {"hf": hf_run, "phi3jax": ours_run}
    llama_run = llama_cpp_greedy(directory, prompt[0].tolist(), new_tokens)
    if llama_run is not None:
        runs["llama_cpp"] = llama_run
    medians = interleaved_medians(runs, repeats)
    hf_s, jax_s = medians["hf"], medians["phi3jax"]
    out = {"hf_tokens_per_s": new_tokens / hf_s, "phi3jax_tokens_per_s": new_tokens / jax_s,
           "speedup": hf_s / jax_s, "same_tokens": bool((hf_tokens == ours_tokens).all())}
    if llama_run is not None:
        out["llama_cpp_tokens_per_s"] = new_tokens / medians["llama_cpp"]
        out["llama_cpp_speedup_over_hf"] = hf_s / medians["llama_cpp"]
        out["phi3jax_vs_llama_cpp"] = medians["llama_cpp"] / jax_s
        out["llama_cpp_same_tokens_as_hf"] = bool((np.asarray(llama_run()) == hf_tokens).all())
    else:
        out["llama_cpp"] = "not measured: needs llama-cpp-python and the Phi-3 tokenizer for the GGUF export"
    return out


def compile_seconds(layers: int, config: dict) -> float:
    cfg = Phi3Config.from_hf(dict(config, num_hidden_layers=layers))
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    tokens = jax.ShapeDtypeStruct((4, 512), jnp.int32)
    start = time.perf_counter()
    jax.jit(logits_fn, static_argnums=1).lower(params, cfg, tokens).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    config = QUICK if args.quick else CONFIG
    results: dict = {"threads": THREADS, "jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "config": config}
    results["matmul_gflops"] = matmul_gflops()
    results["bandwidth_gb_per_s"] = bandwidth_gbs()
    with tempfile.TemporaryDirectory() as d:
        hf, cfg, params = build(d, config)
        n_params = cfg.num_params()
        non_embed = n_params - cfg.vocab_size * cfg.hidden_size
        results["params"] = n_params
        fwd = bench_forward(hf, cfg, params, 4, 512, args.repeats)
        flops_per_token = 2 * non_embed + 2 * cfg.num_hidden_layers * 512 * cfg.hidden_size  # + causal attention
        peak = max(results["matmul_gflops"].values())
        fwd["phi3jax_fraction_of_matmul_peak"] = fwd["phi3jax_tokens_per_s"] * flops_per_token / 1e9 / peak
        fwd["hf_fraction_of_matmul_peak"] = fwd["hf_tokens_per_s"] * flops_per_token / 1e9 / peak
        results["forward_4x512"] = fwd
        dec = bench_decode(hf, cfg, params, d, 32, 128, args.repeats)
        bound = results["bandwidth_gb_per_s"] * 1e9 / (4 * non_embed)
        dec["bandwidth_bound_tokens_per_s"] = bound
        dec["phi3jax_fraction_of_bound"] = dec["phi3jax_tokens_per_s"] / bound
        dec["hf_fraction_of_bound"] = dec["hf_tokens_per_s"] / bound
        if "llama_cpp_tokens_per_s" in dec:
            dec["llama_cpp_fraction_of_bound"] = dec["llama_cpp_tokens_per_s"] / bound
        results["decode_b1_p32_n128"] = dec
    c4, c32 = compile_seconds(4, config), compile_seconds(32, config)
    results["compile_seconds"] = {"layers_4": c4, "layers_32": c32, "ratio": c32 / c4}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
