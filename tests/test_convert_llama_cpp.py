"""The exported GGUF runs in llama.cpp (llama-cpp-python) with phi3jax's logits and tokens.

How llama.cpp is run, and why:
* a float32 KV cache (type_k = type_v = 0): its default float16 cache alone costs about 1e-3;
* sequences shorter than any sliding window: llama.cpp ignores Phi-3's window;
* LongRoPE: llama.cpp picks the long factors when the context it is opened with exceeds the original
  context (256 here), phi3jax when the sequence does; so the short case opens 256 tokens of context
  and the long case 512, and phi3jax is told which factors to use.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from convert_util import CONVERSATIONS, GQA_LONGROPE, TOKENS, make_phi3_hf_dir, reference_tokenisations
from safetensors.numpy import save_file

from phi3jax.convert.gguf import read_gguf_tensors, to_gguf
from phi3jax.convert.hf import load_hf
from phi3jax.model import Phi3
from phi3jax.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dev dependency (pip install -e '.[dev]')")
pytestmark = pytest.mark.usefixtures("phi3_vocab")
GGML_TYPE_F32 = 0


def phi3jax_logits(params, cfg, tokens, long_rope: bool = False) -> np.ndarray:
    ids = np.asarray([tokens], np.int32)
    positions = np.arange(len(tokens), dtype=np.int32)[None]
    logits, _ = Phi3(cfg).apply({"params": params}, ids, positions, long_rope=long_rope)
    return np.asarray(logits[0])


def load_weights(hf_dir, weights: dict[str, np.ndarray], out) -> dict:
    """phi3jax params (float32) of `hf_dir`'s model with its tensors replaced by `weights` (HF names)."""
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out / "config.json")
    save_file({name: np.ascontiguousarray(arr, np.float32) for name, arr in weights.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return load_hf(out, dtype="float32")[1]


def llama_cpp_logits(path, tokens, n_ctx: int) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, type_k=GGML_TYPE_F32,
                          type_v=GGML_TYPE_F32, n_threads=2, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)])
    llm.close()
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    make_phi3_hf_dir(root / "plain", dtype="float32", seed=11)
    make_phi3_hf_dir(root / "longrope", dtype="float32", seed=12, **GQA_LONGROPE)
    return root


@pytest.mark.parametrize("name, n_ctx, long_rope", [("plain", 64, False), ("longrope", 256, False),
                                                    ("longrope", 512, True)])
def test_float32_gguf_gives_phi3jax_logits_in_llama_cpp(models, name, n_ctx, long_rope):
    cfg, params = load_hf(str(models / name), dtype="float32")
    path = to_gguf(models / f"{name}-{n_ctx}.gguf", hf_dir=models / name, quant="f32")
    ours = phi3jax_logits(params, cfg, TOKENS, long_rope)
    theirs = llama_cpp_logits(path, TOKENS, n_ctx)
    np.testing.assert_allclose(theirs, ours, atol=1e-3, rtol=0)
    if name == "longrope":  # the two factor sets really differ here, so the right one was chosen
        assert np.abs(phi3jax_logits(params, cfg, TOKENS, not long_rope) - ours).max() > 1e-2


# llama.cpp multiplies quantised weights by activations it rounds to 8 bits (q8_0 blocks), and f16
# weights by activations it rounds to float16, so even on the very same weights its logits differ
# from float32 math. Tolerances relative to the logits' standard deviation (about 0.65 here), as
# (RMS, worst case); measured on these models: f16 0.05% / 0.3%, q8_0 1.4-1.6% / 9-10%, q4_0
# 1.3-1.5% / 7-9%. A wrong layout gives errors of order 100% (checked below with gate and up swapped).
TOLERANCE = {"f16": (0.005, 0.02), "q8_0": (0.03, 0.2), "q4_0": (0.03, 0.2)}


def _relative_errors(theirs: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    scale = ours.std()
    return float(np.sqrt(np.mean((theirs - ours) ** 2)) / scale), float(np.abs(theirs - ours).max() / scale)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", ["plain", "longrope"])
def test_quantised_gguf_gives_phi3jax_logits_on_the_dequantised_weights(models, quant, name, tmp_path):
    cfg, _ = load_hf(str(models / name), dtype="float32")
    path = to_gguf(models / f"{name}-{quant}.gguf", hf_dir=models / name, quant=quant)
    params = load_weights(models / name, read_gguf_tensors(path, cfg), tmp_path / "dequantised")
    ours = phi3jax_logits(params, cfg, TOKENS)
    theirs = llama_cpp_logits(path, TOKENS, 64 if name == "plain" else 256)
    rms, worst = _relative_errors(theirs, ours)
    print(f"{name} {quant}: rms {rms:.4f} max {worst:.4f} of std {ours.std():.3f}")
    max_rms, max_worst = TOLERANCE[quant]
    assert rms < max_rms and worst < max_worst

    # The tolerance does tell layouts apart: gate and up swapped in phi3jax's copy is far outside it.
    params["layers"]["mlp"]["gate_up"] = params["layers"]["mlp"]["gate_up"][:, :, ::-1]
    assert _relative_errors(theirs, phi3jax_logits(params, cfg, TOKENS))[0] > 10 * TOLERANCE[quant][0]


def test_llama_cpp_tokenises_with_the_exported_vocabulary_as_phi3jax(models):
    path = to_gguf(models / "vocab.gguf", hf_dir=models / "plain", quant="q4_0")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.load(str(models / "plain"))
    for text, ids in reference_tokenisations():
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
    for conv in CONVERSATIONS:  # special tokens parsed, rstrip tokens swallowing the newline after them
        text = tok.apply_chat_template(conv)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tok.encode(text), text
    llm.close()
