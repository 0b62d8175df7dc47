"""LoRA adapters against Hugging Face PEFT on transformers' Phi3ForCausalLM (PyTorch).

Both directions, on a GQA and an MHA model, float32: an adapter exported by phi3jax and loaded by
`peft.PeftModel.from_pretrained` gives phi3jax's LoRA logits, and an adapter made by `peft` (with a
non-zero B) imported into phi3jax gives transformers + peft's logits. Tolerance 1e-4: the same
float32 math summed in another order over 2 layers (measured differences are ~1e-6).
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from conftest import PHI3_VOCAB, make_hf_model
from convert_util import PHI3_IDS, TOKENS

from phi3jax import lora as lora_lib
from phi3jax.config import LoraConfig
from phi3jax.convert.hf import load_hf
from phi3jax.convert.lora import load_lora_run
from phi3jax.convert.peft import lora_to_peft, peft_to_lora, read_peft, write_peft
from phi3jax.model import Phi3

pytestmark = pytest.mark.torch
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _base(directory, kv_heads):
    model = make_hf_model(directory, seed=3, num_key_value_heads=kv_heads, **PHI3_IDS)
    shutil.copyfile(PHI3_VOCAB / "tokenizer.model", directory / "tokenizer.model")
    return model


def _ours(cfg, variables, lora=None):
    tokens = np.asarray([TOKENS], np.int32)
    positions = np.arange(len(TOKENS), dtype=np.int32)[None]
    return np.asarray(Phi3(cfg, lora=lora).apply(variables, tokens, positions)[0][0])


def _theirs(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_exported_adapter_loaded_by_peft_gives_phi3jax_lora_logits(tmp_path, kv_heads):
    from peft import PeftModel

    model = _base(tmp_path / "base", kv_heads)
    cfg, base = load_hf(tmp_path / "base", dtype="float32")
    lora = LoraConfig(rank=4, alpha=8, targets=("qkv", "o", "gate_up", "down"))
    fresh = lora_lib.init_adapters(cfg, lora, 1)
    keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(fresh))))
    adapters = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), fresh)
    write_peft(adapters, cfg, lora, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    ours = _ours(cfg, {"params": base, "lora": adapters}, lora)
    np.testing.assert_allclose(_theirs(peft_model), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - _ours(cfg, {"params": base})).max() > 1e-2  # the adapter changes the logits


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_adapter_made_by_peft_imported_gives_transformers_peft_logits(tmp_path, kv_heads):
    import peft

    model = _base(tmp_path / "base", kv_heads)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                             init_lora_weights=False)  # B random, not zero: the import must get it right
    peft_model = peft.get_peft_model(model, config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    theirs = _theirs(peft_model)
    cfg, base = load_hf(tmp_path / "base", dtype="float32")
    lora, adapters = read_peft(tmp_path / "adapter", cfg)
    assert (lora.rank, lora.scale) == (4, 4.0)
    np.testing.assert_allclose(_ours(cfg, {"params": base, "lora": adapters}, lora), theirs, atol=1e-4, rtol=0)
    # as a run directory: loaded merged (generate / chat / eval), and exported again unchanged
    run_dir = peft_to_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "run")
    run_cfg, merged, _ = load_lora_run(run_dir, dtype="float32")
    np.testing.assert_allclose(_ours(run_cfg, {"params": merged}), theirs, atol=1e-4, rtol=0)
    again = peft.PeftModel.from_pretrained(_base(tmp_path / "base2", kv_heads), lora_to_peft(run_dir, tmp_path / "x"))
    np.testing.assert_allclose(_theirs(again.eval()), theirs, atol=1e-5, rtol=0)
