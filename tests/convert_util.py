"""Helpers shared by the converter tests: small HF Phi-3 models on the real Phi-3 vocabulary."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
from conftest import PHI3_VOCAB, longrope_parameters, make_hf_dir

# The real 32064-token vocabulary, so the tokenizer and GGUF vocab tests use Phi-3's ids.
PHI3_IDS = dict(vocab_size=32064, pad_token_id=32000, eos_token_id=32000, bos_token_id=1)
# GQA (4 query heads share 2 kv heads), partial rotary (8 of 16 dims) and LongRoPE. The original
# context (256) is a multiple of llama.cpp's context padding, so n_ctx=256 selects the short factors
# there and n_ctx=512 the long ones.
GQA_LONGROPE = dict(num_key_value_heads=2, original_max_position_embeddings=256, max_position_embeddings=1024,
                    rope_parameters=longrope_parameters(8, partial_rotary_factor=0.5))

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!\n  How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"},
     {"role": "assistant", "content": " 4, of course.\n"}, {"role": "user", "content": "Why   not 5?\t"}],
    [{"role": "user", "content": "Ünïcödé 🦙 and <|end|> inside text, then <s> and </s>."},
     {"role": "assistant", "content": "\n\nOK"}],
]

# A short prompt of real Phi-3 ids: "<s> The quick brown fox ... <|user|>\nHello<|end|>"
TOKENS = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 32010, 13, 15043, 32007]


def make_phi3_hf_dir(directory: str | os.PathLike, dtype: str = "float32", seed: int = 0, **overrides) -> pathlib.Path:
    """A random-weight Hugging Face Phi-3 directory with the real vocabulary's ids and tokenizer.model."""
    make_hf_dir(directory, seed=seed, dtype=dtype, **{**PHI3_IDS, **overrides})
    shutil.copyfile(PHI3_VOCAB / "tokenizer.model", pathlib.Path(directory) / "tokenizer.model")
    return pathlib.Path(directory)


def reference_tokenisations() -> list[tuple[str, list[int]]]:
    """The 47 (text, ids) pairs of llama.cpp's Phi-3 vocab test (ids without BOS)."""
    texts = (PHI3_VOCAB / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (PHI3_VOCAB / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == len(ids) == 47
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids, strict=True)]


def raw_tensors(directory: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor of a safetensors directory."""
    from phi3jax.convert.safetensors import SafetensorsReader

    reader = SafetensorsReader(os.fspath(directory))
    out = {}
    for name in reader.names():
        arr = reader.get(name)
        out[name] = (arr.dtype.name, arr.shape, np.ascontiguousarray(arr).tobytes())
    return out
