"""Converters are safe: inputs validated before any output exists, errors that name the tensor and
the problem, outputs written under a temporary name and renamed, nothing replaced without --force."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from convert_util import make_phi3_hf_dir

from phi3jax.cli.main import main
from phi3jax.convert.gguf import GGUFExportError, to_gguf
from phi3jax.convert.hf import HFSource
from phi3jax.convert.orbax import OrbaxSource, hf_to_orbax, orbax_to_hf
from phi3jax.convert.safetensors import CheckpointError, SafetensorsReader, SafetensorsWriter

pytestmark = pytest.mark.usefixtures("phi3_vocab")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_phi3_hf_dir(root / "hf", dtype="float32", seed=4)
    hf_to_orbax(root / "hf", root / "run")
    return root


def _leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if ".tmp-" in n]


def rewrite(hf, out, drop=(), add=None, cast=None, reshape=None):
    """A copy of HF directory `hf` with tensors dropped / added / cast / reshaped."""
    shutil.copytree(hf, out)
    reader = SafetensorsReader(str(hf))
    tensors = {n: reader.get(n) for n in sorted(reader.names()) if n not in drop}
    for name, dtype in (cast or {}).items():
        tensors[name] = tensors[name].astype(dtype)
    for name, shape in (reshape or {}).items():
        tensors[name] = np.zeros(shape, tensors[name].dtype)
    tensors.update(add or {})
    for f in os.listdir(out):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(out / f)
    with SafetensorsWriter(str(out / "model.safetensors"), [(n, a.dtype, a.shape) for n, a in tensors.items()]) as w:
        for n, a in tensors.items():
            w.write(n, a)
    return out


# ------------------------------------------------------------------------ validation errors
def test_missing_tensor_is_named(src, tmp_path):
    bad = rewrite(src / "hf", tmp_path / "bad", drop=["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight is missing"):
        hf_to_orbax(bad, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_extra_tensor_is_named(src, tmp_path):
    bad = rewrite(src / "hf", tmp_path / "bad", add={"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        to_gguf(tmp_path / "out.gguf", hf_dir=bad)
    assert not _leftovers(tmp_path) and not os.path.exists(tmp_path / "out.gguf")


def test_shape_mismatch_with_config_is_named(src, tmp_path):
    bad = rewrite(src / "hf", tmp_path / "bad", reshape={"model.layers.0.mlp.gate_up_proj.weight": (192, 64)})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.gate_up_proj\.weight has shape "
                                              r"\[192, 64\], but config\.json implies \[256, 64\]"):
        hf_to_orbax(bad, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_dtype_mismatch_with_config_is_named(src, tmp_path):
    bad = rewrite(src / "hf", tmp_path / "bad", cast={"model.norm.weight": np.float16})
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight is stored as float16, but config\.json "
                                              r"declares torch_dtype float32"):
        hf_to_orbax(bad, tmp_path / "out")


def test_truncated_safetensors_is_refused_naming_the_cut_tensor(src, tmp_path):
    bad = rewrite(src / "hf", tmp_path / "bad")
    file = bad / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 100)
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*|tensor .* past the end of the file"):
        hf_to_orbax(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight ends at byte \d+, past the end"):
        SafetensorsReader(str(bad))
    assert not os.path.exists(tmp_path / "out")


def test_corrupt_safetensors_header_is_refused(src, tmp_path):
    bad = rewrite(src / "hf", tmp_path / "bad")
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(9)
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors file.*header is not JSON"):
        HFSource(bad)


def test_pickled_checkpoint_is_refused_with_how_to(src, tmp_path):
    os.makedirs(tmp_path / "bin")
    shutil.copy(src / "hf" / "config.json", tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(CheckpointError, match=r"pickled PyTorch weights \(pytorch_model\.bin.*save_pretrained"):
        hf_to_orbax(tmp_path / "bin", tmp_path / "out")


def test_quant_a_shape_cannot_take_is_refused_naming_the_tensor(tmp_path):
    make_phi3_hf_dir(tmp_path / "hf", hidden_size=48, num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(GGUFExportError, match=r"tensor model\.embed_tokens\.weight \(token_embd\.weight\) has rows "
                                              r"of 48 values, not a multiple of q4_0's block of 32"):
        to_gguf(tmp_path / "m.gguf", hf_dir=tmp_path / "hf", quant="q4_0")
    assert not os.path.exists(tmp_path / "m.gguf") and not _leftovers(tmp_path)
    to_gguf(tmp_path / "m.gguf", hf_dir=tmp_path / "hf", quant="f16")  # the suggested fix works


def test_phi4_bpe_tokenizer_is_refused_for_gguf(src, tmp_path):
    shutil.copytree(src / "hf", tmp_path / "phi4")
    os.remove(tmp_path / "phi4" / "tokenizer.model")
    (tmp_path / "phi4" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(GGUFExportError, match=r"Phi-4-mini.*gpt-4o.*convert_hf_to_gguf\.py"):
        to_gguf(tmp_path / "m.gguf", hf_dir=tmp_path / "phi4")
    assert not os.path.exists(tmp_path / "m.gguf")


def test_orbax_checkpoint_not_matching_its_config_is_named(src, tmp_path):
    shutil.copytree(src / "run", tmp_path / "run")
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    config["model"]["intermediate_size"] = 96
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"leaf layers/mlp/down has shape \[2, 128, 64\], but config\.yaml "
                                              r"implies \[2, 96, 64\]"):
        orbax_to_hf(tmp_path / "run", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_a_special_id_no_token_has_is_refused_before_anything_is_written(src, tmp_path, capsys, direction):
    """Issue 20: eos = pad = 32000 while the tokenizer declares no token 32000 (a tokenizer_config.json
    without added tokens, no added_tokens.json). One line naming the id, and no output at all."""
    source = tmp_path / ("hf" if direction == "hf-to-orbax" else "run")
    shutil.copytree(src / source.name, source)
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    flag = "--hf-dir" if direction == "hf-to-orbax" else "--ckpt"
    assert main(["convert", direction, flag, str(source), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "eos_token_id 32000 is not a token of its tokenizer" in err and "added_tokens.json" in err, err
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)

# ----------------------------------------------------------------- atomic, never overwrite
@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf", "to-gguf"])
def test_existing_output_is_kept_without_force_and_replaced_with_it(src, tmp_path, capsys, direction):
    out = tmp_path / ("out.gguf" if direction == "to-gguf" else "out")
    if direction == "to-gguf":
        out.write_text("precious")
    else:
        os.makedirs(out)
        (out / "precious").write_text("precious")
    source = ["--hf-dir", str(src / "hf")] if direction != "orbax-to-hf" else ["--ckpt", str(src / "run")]
    argv = ["convert", direction, *source, "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (out.read_text() if direction == "to-gguf" else (out / "precious").read_text()) == "precious"
    assert main([*argv, "--force"]) == 0
    assert os.path.getsize(out) > 1000 if direction == "to-gguf" else not os.path.exists(out / "precious")
    assert not _leftovers(tmp_path)


def test_a_failed_conversion_leaves_no_output_and_keeps_the_old_one(src, tmp_path, monkeypatch):
    calls = []

    def broken_layer(self, key, l):
        if l is None:  # a top-level leaf: read on
            return original[type(self)](self, key, l)
        calls.append(l)
        raise OSError(f"disk gone while reading layer {l}")

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "precious").write_text("precious")
    original = {OrbaxSource: OrbaxSource.leaf, HFSource: HFSource.leaf}
    monkeypatch.setattr(OrbaxSource, "leaf", broken_layer)
    with pytest.raises(OSError, match="disk gone"):
        orbax_to_hf(src / "run", tmp_path / "old", force=True)
    with pytest.raises(OSError, match="disk gone"):
        to_gguf(tmp_path / "new.gguf", ckpt=src / "run")
    monkeypatch.setattr(HFSource, "leaf", broken_layer)
    with pytest.raises(OSError, match="disk gone"):
        hf_to_orbax(src / "hf", tmp_path / "new")
    assert calls  # the failures happened mid-conversion, after the outputs were started
    assert (tmp_path / "old" / "precious").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["old"]


def test_python_dash_m_phi3jax_convert(src, tmp_path):
    out = subprocess.run([sys.executable, "-m", "phi3jax.convert", "to-gguf", "--hf-dir", str(src / "hf"),
                          "--out", str(tmp_path / "m.gguf"), "--quant", "q8_0", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and os.path.isfile(tmp_path / "m.gguf")
    # On a machine without accelerators the command runs JAX on the CPU only: an installed libtpu
    # (the dev extra) is never probed, so none of its start-up warnings appear.
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr
