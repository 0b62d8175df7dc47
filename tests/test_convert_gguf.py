"""GGUF export: what a reader sees (keys, tensor names, shapes, types), the header llama.cpp's own
Phi-3 vocab file has, and quantised weights that dequantise to the originals."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from convert_util import GQA_LONGROPE, make_phi3_hf_dir

from phi3jax.config import Phi3Config
from phi3jax.convert.gguf import add_metadata, read_gguf_tensors, to_gguf
from phi3jax.convert.keys import hf_shapes
from phi3jax.convert.orbax import hf_to_orbax
from phi3jax.convert.safetensors import SafetensorsReader
from phi3jax.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("phi3_vocab")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    make_phi3_hf_dir(root / "hf", dtype="bfloat16", seed=2, **GQA_LONGROPE)
    hf_to_orbax(root / "hf", root / "run")
    return root


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("quant, weight_type", [("f32", T.F32), ("f16", T.F16), ("q8_0", T.Q8_0),
                                                ("q4_0", T.Q4_0)])
def test_gguf_reads_back_with_expected_keys_tensors_shapes_and_types(model, quant, weight_type):
    path = to_gguf(model / f"m-{quant}.gguf", ckpt=model / "run", quant=quant)
    cfg = Phi3Config.from_hf(model / "hf")
    r = gguf.GGUFReader(path)
    expected_keys = {
        "general.architecture": "phi3", "phi3.context_length": 1024, "phi3.embedding_length": 64,
        "phi3.feed_forward_length": 128, "phi3.block_count": 2, "phi3.attention.head_count": 4,
        "phi3.attention.head_count_kv": 2, "phi3.rope.dimension_count": 8, "phi3.rope.freq_base": 10000.0,
        "phi3.rope.scaling.original_context_length": 256, "phi3.attention.sliding_window": 0,
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[quant], "general.quantization_version": 2,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 32000, "tokenizer.ggml.padding_token_id": 32000,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in expected_keys.items():
        assert _field(r, key) == value, key
    assert _field(r, "general.name").lower().startswith("phi3")  # llama.cpp keys Phi-3's rstrip tokens on it
    assert _field(r, "phi3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    # sqrt(1 + ln(1024/256) / ln(256)), stored as float32
    assert _field(r, "phi3.rope.scaling.attn_factor") == pytest.approx(np.sqrt(1.25), rel=1e-6)
    assert _field(r, "tokenizer.chat_template") == Tokenizer.load(str(model / "run")).chat_template
    assert len(_field(r, "tokenizer.ggml.tokens")) == 32064

    names = {t.name: t for t in r.tensors}
    expected = {"token_embd.weight": ((64, 32064), weight_type), "output_norm.weight": ((64,), T.F32),
                "output.weight": ((64, 32064), weight_type), "rope_factors_long.weight": ((4,), T.F32),
                "rope_factors_short.weight": ((4,), T.F32)}
    for l in range(2):  # GGUF lists dims innermost first: [in, out]
        expected.update({f"blk.{l}.attn_norm.weight": ((64,), T.F32), f"blk.{l}.ffn_norm.weight": ((64,), T.F32),
                         f"blk.{l}.attn_qkv.weight": ((64, 64 + 2 * 32), weight_type),
                         f"blk.{l}.attn_output.weight": ((64, 64), weight_type),
                         f"blk.{l}.ffn_up.weight": ((64, 256), weight_type),
                         f"blk.{l}.ffn_down.weight": ((128, 64), weight_type)})
    assert set(names) == set(expected)
    for name, (shape, ttype) in expected.items():
        assert tuple(int(d) for d in names[name].shape) == shape, name
        assert names[name].tensor_type == ttype, name
    np.testing.assert_array_equal(names["rope_factors_long.weight"].data, np.float32(cfg.rope_long_factor))
    np.testing.assert_array_equal(names["rope_factors_short.weight"].data, np.float32(cfg.rope_short_factor))


def test_header_matches_llama_cpps_own_phi3_vocab_file(phi3_vocab, tmp_path):
    """Phi-3-mini-4k's header written by us vs llama.cpp's vocab-only GGUF of it: every key both
    have, with its type and value. Allowed differences, each for a stated reason: general.name
    (ours is free text); token types of the 53 padding ids (the reference was made by an older
    converter that typed them UNKNOWN, today's types them UNUSED) and of `</s>` (Phi-3's
    tokenizer_config.json marks it non-special, phi3jax's Tokenizer treats it as special)."""
    ref = gguf.GGUFReader(phi3_vocab / "ggml-vocab-phi-3.gguf")
    template = ref.fields["tokenizer.chat_template"].contents()
    tok = Tokenizer.phi3(phi3_vocab / "tokenizer.model", chat_template=template)
    writer = gguf.GGUFWriter(tmp_path / "header.gguf", "phi3")
    add_metadata(writer, Phi3Config.preset("phi-3-mini-4k"), tok, "f16")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    ours = gguf.GGUFReader(tmp_path / "header.gguf")

    ref_keys = {k for k in ref.fields if not k.startswith("GGUF.")}  # GGUF.* are the file's own counts
    assert ref_keys <= set(ours.fields)  # every key of the reference is written
    # Newer than the reference: the sliding window, and add_space_prefix (llama.cpp's default for a
    # "llama" vocabulary, true, written out from the SentencePiece model's add_dummy_prefix).
    assert set(ours.fields) - set(ref.fields) == {"phi3.attention.sliding_window", "tokenizer.ggml.add_space_prefix"}
    assert ours.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    for key in sorted(ref_keys - {"general.name", "tokenizer.ggml.token_type"}):
        assert ours.fields[key].types == ref.fields[key].types, key
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    ref_types, our_types = (np.asarray(f.fields["tokenizer.ggml.token_type"].contents()) for f in (ref, ours))
    differ = set(np.nonzero(ref_types != our_types)[0].tolist())
    assert differ == {2, *range(32011, 32064)}
    assert set(our_types[32011:]) == {gguf.TokenType.UNUSED} and our_types[2] == gguf.TokenType.CONTROL


def test_quantised_weights_dequantise_to_the_originals(model):
    """q8_0 keeps each weight within half a step of its block's scale (max/127), q4_0 within one
    step (max/8); measured as RMS error relative to each tensor's RMS."""
    original = SafetensorsReader(str(model / "hf"))
    limits = {"f32": 0.0, "f16": 1e-3, "q8_0": 0.01, "q4_0": 0.12}
    for quant, limit in limits.items():
        cfg = Phi3Config.from_hf(model / "hf")
        weights = read_gguf_tensors(to_gguf(model / f"d-{quant}.gguf", hf_dir=model / "hf", quant=quant), cfg)
        assert set(weights) == set(hf_shapes(cfg))
        for name, arr in weights.items():
            ref = original.get(name).astype(np.float32)
            assert arr.shape == ref.shape, name
            rel = np.sqrt(np.mean((arr - ref) ** 2) / np.mean(ref**2))
            assert rel <= limit if arr.ndim == 2 else rel == 0.0, (quant, name, rel)


def test_gguf_from_hf_dir_and_from_run_dir_are_the_same_file(model):
    a = to_gguf(model / "a.gguf", hf_dir=model / "hf", quant="q4_0", name="Phi3 x")
    b = to_gguf(model / "b.gguf", ckpt=model / "run", quant="q4_0", name="Phi3 x")
    assert open(a, "rb").read() == open(b, "rb").read()
