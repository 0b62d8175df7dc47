"""Shared test helpers: small random-weight Hugging Face Phi-3 models built on the spot."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (a dev dependency, for the AOT TPU compiles) otherwise takes a host-wide lock: a second
# process (a parallel test run, another tool) could then not create TPU topologies.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = pathlib.Path(__file__).resolve().parent.parent
PHI3_VOCAB = REPO.parent / "shared" / "data" / "phi3-vocab"

# A small Phi-3: 2 layers, hidden 64, 4 heads of 16. pad_token_id must be inside the vocab.
BASE_HF_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      original_max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, sliding_window=None, rms_norm_eps=1e-5)


def longrope_parameters(rotary_dim: int, theta: float = 10000.0, **extra: float) -> dict:
    half = rotary_dim // 2
    return dict(rope_type="longrope", rope_theta=theta, short_factor=np.linspace(1.0, 1.5, half).tolist(),
                long_factor=np.linspace(1.0, 6.0, half).tolist(), **extra)


def make_hf_model(directory: str | os.PathLike, seed: int = 0, dtype: str = "float32", **overrides):
    """Build, randomise (norm weights away from 1) and save a transformers Phi3ForCausalLM."""
    import torch
    import transformers

    config = transformers.Phi3Config(**{**BASE_HF_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # a wrong norm must show in the logits
            else:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def phi3_vocab() -> pathlib.Path:
    if not (PHI3_VOCAB / "tokenizer.model").is_file():
        pytest.skip(f"the Phi-3 vocabulary is not at {PHI3_VOCAB}")
    return PHI3_VOCAB
