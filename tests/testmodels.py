"""Small models with the real Phi-3 tokenizer, for the eval / generate / chat tests."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
from conftest import PHI3_VOCAB, make_hf_dir

from phi3jax.tokenizer import PHI3_VOCAB_SIZE

PHI3_IDS = dict(vocab_size=PHI3_VOCAB_SIZE, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
END, ASSISTANT, USER = 32007, 32001, 32010
HELLO, WORLD = 15043, 3186  # "▁Hello", "▁world" in Phi-3's SentencePiece model


def copy_tokenizer(directory: str | os.PathLike) -> None:
    shutil.copy(PHI3_VOCAB / "tokenizer.model", pathlib.Path(directory) / "tokenizer.model")


def make_random_phi3(directory: str | os.PathLike, seed: int = 0, **overrides) -> pathlib.Path:
    """A random 2-layer HF Phi-3 (hidden 64) with Phi-3's 32064-token vocabulary and tokenizer (no torch)."""
    make_hf_dir(directory, seed=seed, **{**PHI3_IDS, **overrides})
    copy_tokenizer(directory)
    return pathlib.Path(directory)


def load_torch_model(directory: str | os.PathLike):
    """transformers' own Phi3ForCausalLM (PyTorch, float32) on a directory's weights: the reference."""
    import torch
    import transformers

    return transformers.Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_hello_world_model(directory: str | os.PathLike, endless: bool = False) -> None:
    """A 1-layer Phi-3 whose greedy reply to any chat prompt is "Hello world<|end|>".

    endless=True: "Hello world Hello world ..." instead, never a stop token (▁world -> ▁Hello).

    Attention and MLP outputs are zeroed (o = down = 0), so the residual stream is the token's
    embedding and the next token depends on the current one only: a bigram table. Embeddings
    are basis vectors; RMSNorm maps e_i to 8 e_i, and lm_head columns are sums of basis vectors
    scaled so the intended successor has logit 8 and every other token logit 0:

        <|assistant|> -> ▁Hello -> ▁world -> <|end|> -> ▁Hello (if generation went on), else -> ▁Hello
    """
    from phi3jax.config import Phi3Config
    from phi3jax.convert.hf import save_hf
    from phi3jax.model import init_params

    d = 64
    cfg = Phi3Config(hidden_size=d, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=1024, original_max_position_embeddings=1024,
                     eos_token_id=(32000,), pad_token_id=32000, bos_token_id=1, vocab_size=PHI3_VOCAB_SIZE)
    params = init_params(cfg, 0)
    eye = np.eye(d, dtype=np.float32)
    basis = {ASSISTANT: 1, HELLO: 2, WORLD: 3, END: 4}
    embed = np.tile(eye[0], (cfg.vocab_size, 1))
    for tok, i in basis.items():
        embed[tok] = eye[i]
    head = np.zeros((d, cfg.vocab_size), np.float32)
    head[:, HELLO] = eye[0] + eye[basis[ASSISTANT]] + eye[basis[END]]
    head[:, WORLD] = eye[basis[HELLO]]
    if endless:
        head[:, HELLO] += eye[basis[WORLD]]
    else:
        head[:, END] = eye[basis[WORLD]]
    layers = {k: {n: np.asarray(v) for n, v in sub.items()} for k, sub in params["layers"].items()}
    layers["attn"]["o"] = np.zeros_like(layers["attn"]["o"])
    layers["mlp"]["down"] = np.zeros_like(layers["mlp"]["down"])
    params = {"embed": embed, "layers": layers, "final_norm": {"scale": np.ones(d, np.float32)}, "lm_head": head}
    save_hf(params, cfg, directory, dtype="float32", overwrite=True)
    copy_tokenizer(directory)


def make_run_dir(hf_dir: str | os.PathLike, run_dir: str | os.PathLike, step: int = 10) -> pathlib.Path:
    """A run directory (config.yaml, tokenizer.model, checkpoints/<step>/params) holding an HF model's weights."""
    from phi3jax.convert.hf import load_hf
    from phi3jax.train.checkpoint import model_fields, save_params, write_yaml

    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, params = load_hf(hf_dir)
    write_yaml(str(run_dir / "config.yaml"), {"model": model_fields(cfg)})
    shutil.copy(pathlib.Path(hf_dir) / "tokenizer.model", run_dir / "tokenizer.model")
    save_params(str(run_dir), step, params, cfg)
    return run_dir
