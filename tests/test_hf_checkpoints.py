"""load_hf / save_hf: bit-identical round trips, loadability in transformers, clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from phi3jax import Phi3Config, forward, load_hf, save_hf
from phi3jax.convert.hf import CheckpointError
from tests.conftest import longrope_parameters, make_hf_dir, make_hf_model


def read_all_tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_phi3jax_to_hf_is_bit_identical(tmp_path, dtype, tied):
    extra = dict(tie_word_embeddings=True, partial_rotary_factor=0.5, original_max_position_embeddings=64,
                 rope_parameters=longrope_parameters(8, partial_rotary_factor=0.5)) if tied else {}
    make_hf_dir(tmp_path / "hf", dtype=dtype, num_key_value_heads=2, **extra)
    cfg, params = load_hf(tmp_path / "hf")
    assert cfg.param_dtype == dtype and ("lm_head" in params) == (not tied)
    # A small shard limit forces several shards and an index.
    save_hf(params, cfg, tmp_path / "out", dtype=dtype, max_shard_bytes=64 * 1024)
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    original, saved = read_all_tensors(tmp_path / "hf"), read_all_tensors(tmp_path / "out")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and saved[name].shape == tensor.shape, name
        assert saved[name].tobytes() == tensor.tobytes(), name
    assert Phi3Config.from_hf(tmp_path / "out") == Phi3Config.from_hf(tmp_path / "hf")


@pytest.mark.torch
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    import torch
    import transformers

    make_hf_model(tmp_path / "hf", num_key_value_heads=2, sliding_window=11)
    cfg, params = load_hf(tmp_path / "hf")
    save_hf(params, cfg, tmp_path / "out", dtype="float32", stop_tokens=(7,))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.sliding_window == 11 and hf.generation_config.eos_token_id == [2, 7]
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(params, cfg, tokens)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_each_leaf_is_its_hf_tensor_reshaped_as_the_reference_says(tmp_path, kv_heads):
    """The fused layout against the HF layout written out by hand here (PHI3_REFERENCE: qkv rows are q,
    then k, then v heads; gate_up rows gate, then up; Linear weights [out, in]), not through the key table."""
    make_hf_dir(tmp_path / "hf", num_key_value_heads=kv_heads)
    cfg, params = load_hf(tmp_path / "hf")
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    d, h, kv, hd, i = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 128
    layer = {k: np.asarray(v[1]) for k, v in params["layers"]["attn"].items()}
    qkv = hf["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = qkv[:h * hd], qkv[h * hd:(h + kv) * hd], qkv[(h + kv) * hd:]
    for got, rows, heads in ((layer["qkv"][:, 0] if kv == h else layer["q"], q, h),
                             (layer["qkv"][:, 1] if kv == h else layer["kv"][:, 0], k, kv),
                             (layer["qkv"][:, 2] if kv == h else layer["kv"][:, 1], v, kv)):
        np.testing.assert_array_equal(got, rows.reshape(heads, hd, d).transpose(2, 0, 1))
    np.testing.assert_array_equal(layer["o"], hf["model.layers.1.self_attn.o_proj.weight"].T.reshape(h, hd, d))
    gate_up = np.asarray(params["layers"]["mlp"]["gate_up"][1])
    np.testing.assert_array_equal(gate_up[:, 0], hf["model.layers.1.mlp.gate_up_proj.weight"][:i].T)
    np.testing.assert_array_equal(gate_up[:, 1], hf["model.layers.1.mlp.gate_up_proj.weight"][i:].T)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), hf["lm_head.weight"].T)


def test_a_tensor_stored_in_another_dtype_than_config_declares_is_refused(tmp_path):
    """One validation path: load_hf checks config.json's torch_dtype as the converters do."""
    make_hf_dir(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw["torch_dtype"] = raw["dtype"] = "bfloat16"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="declares torch_dtype bfloat16"):
        load_hf(tmp_path / "hf")


@pytest.fixture()
def hf_dir(tmp_path):
    make_hf_dir(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_config_json_is_named(hf_dir):
    os.remove(hf_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(hf_dir)


def _rewrite_weights(hf_dir, edit):
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    _rewrite_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.down_proj.weight is missing"):
        load_hf(hf_dir)


def test_shape_mismatch_with_config_is_named(hf_dir):
    def shrink(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :32].copy()

    _rewrite_weights(hf_dir, shrink)
    message = r"o_proj.weight has shape \[64, 32\], but config.json implies \[64, 64\]"
    with pytest.raises(CheckpointError, match=message):
        load_hf(hf_dir)


def test_unexpected_tensor_is_named(hf_dir):
    _rewrite_weights(hf_dir, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.extra.weight"):
        load_hf(hf_dir)


def test_truncated_safetensors_is_reported(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf(hf_dir)


def test_pickled_checkpoints_are_refused_with_a_way_out(hf_dir):
    os.remove(hf_dir / "model.safetensors")
    (hf_dir / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"save_pretrained\(OUT\)"):
        load_hf(hf_dir)


def test_save_never_overwrites_an_existing_output(hf_dir, tmp_path):
    cfg, params = load_hf(hf_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(params, cfg, out)
    assert (out / "keep.txt").read_text() == "precious"
    save_hf(params, cfg, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporaries left behind


def test_a_failed_save_leaves_nothing_behind(hf_dir, tmp_path):
    cfg, params = load_hf(hf_dir)
    del params["layers"]["mlp"]["down"]  # writing will fail half way through
    with pytest.raises(KeyError):
        save_hf(params, cfg, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_config_json_written_is_what_load_reads(hf_dir, tmp_path):
    cfg, params = load_hf(hf_dir)
    save_hf(params, cfg, tmp_path / "out", dtype="bfloat16")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["model_type"] == "phi3"
    cfg16, params16 = load_hf(tmp_path / "out")
    assert cfg16.param_dtype == "bfloat16" and params16["embed"].dtype.name == "bfloat16"


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_block_of_every_leaf_reads_as_that_block_of_the_whole_leaf(tmp_path, kv_heads):
    """Sharded loading reads a device's block as a few HF row and column runs (keys.block_runs): for
    blocks cut along every dimension (halves, as fsdp/tensor shards cut them), the block read equals
    the same block of the whole leaf, bit for bit."""
    import itertools

    from phi3jax.convert.hf import HFSource
    from phi3jax.convert.keys import hf_keys

    make_hf_dir(tmp_path / "hf", num_key_value_heads=kv_heads)
    source = HFSource(tmp_path / "hf")
    for key in hf_keys(source.cfg):
        layer = 1 if key.per_layer else None
        whole = source.leaf(key, layer)
        halves = [[slice(0, n // 2), slice(n // 2, n)] if n % 2 == 0 and n > 1 else [slice(0, n)] for n in key.shape]
        for index in itertools.product(*halves):
            np.testing.assert_array_equal(source.block(key, layer, index), whole[index], err_msg=f"{key.leaf} {index}")
