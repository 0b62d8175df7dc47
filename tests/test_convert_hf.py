"""orbax run directories <-> Hugging Face directories: bit-identical round trips, transformers
loading the export with phi3jax's logits, and an exported tokenizer that AutoTokenizer runs exactly
as phi3jax's Tokenizer does."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from convert_util import (
    CONVERSATIONS,
    GQA_LONGROPE,
    TOKENS,
    make_phi3_hf_dir,
    raw_tensors,
    reference_tokenisations,
)

from phi3jax.config import Phi3Config
from phi3jax.convert.hf import load_hf
from phi3jax.convert.orbax import OrbaxSource, hf_to_orbax, orbax_to_hf
from phi3jax.model import abstract_params, forward
from phi3jax.tokenizer import Tokenizer
from phi3jax.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("phi3_vocab")


def _bits(tree):
    """Leaves as raw bytes, so equality means bit-identical (NaN payloads and -0.0 included)."""
    return jax.tree.map(lambda x: (np.asarray(x).dtype.name, np.asarray(x).shape, np.asarray(x).tobytes()), tree)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_orbax_to_hf_is_bit_identical(tmp_path, dtype):
    make_phi3_hf_dir(tmp_path / "hf", dtype=dtype, **GQA_LONGROPE)
    cfg = hf_to_orbax(tmp_path / "hf", tmp_path / "run")
    assert cfg.param_dtype == dtype  # the checkpoint's dtype is kept by default
    orbax_to_hf(tmp_path / "run", tmp_path / "hf2", dtype=dtype, max_shard_bytes=2**20)  # several shards
    assert os.path.isfile(tmp_path / "hf2" / "model.safetensors.index.json")
    assert raw_tensors(tmp_path / "hf2") == raw_tensors(tmp_path / "hf")
    assert Phi3Config.from_hf(tmp_path / "hf2") == Phi3Config.from_hf(tmp_path / "hf")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_to_hf_to_orbax_is_bit_identical(tmp_path, phi3_vocab, dtype):
    # Start from a checkpoint written the way train.py writes them (checkpoint.save_params).
    cfg = Phi3Config.preset("tiny", vocab_size=32064, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            pad_token_id=32000, eos_token_id=32000, param_dtype=dtype, dtype=dtype)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(a.dtype), abstract_params(cfg))
    run = tmp_path / "run"
    os.makedirs(run)
    ckpt.write_yaml(str(run / ckpt.CONFIG_FILE), {"model": ckpt.model_fields(cfg)})
    (run / "tokenizer.model").write_bytes((phi3_vocab / "tokenizer.model").read_bytes())
    ckpt.save_params(str(run), 7, params, cfg)

    orbax_to_hf(run, tmp_path / "hf", dtype=dtype)
    hf_to_orbax(tmp_path / "hf", tmp_path / "run2", step=7)
    back = ckpt.restore_params(str(tmp_path / "run2"), 7, ckpt.model_config(str(tmp_path / "run2")))
    assert _bits(back) == _bits(params)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """HF (float32, GQA + partial rotary + LongRoPE) -> run dir -> HF again, with tokenizer."""
    root = tmp_path_factory.mktemp("exported")
    make_phi3_hf_dir(root / "hf", dtype="float32", seed=5, **GQA_LONGROPE)
    hf_to_orbax(root / "hf", root / "run")
    orbax_to_hf(root / "run", root / "out", dtype="float32")
    return root


def test_run_directory_is_what_train_and_generate_read(exported):
    cfg, params, tok = ckpt.load_run(str(exported / "run"))
    ref_cfg, ref_params = load_hf(str(exported / "hf"))
    assert cfg == ref_cfg
    np.testing.assert_array_equal(forward(params, cfg, [TOKENS]), forward(ref_params, ref_cfg, [TOKENS]))
    assert tok.encode("<|user|>\nHi<|end|>") == [32010, 6324, 32007]
    # Restoring onto shardings (what a trainer does) gives jax arrays.
    shardings = jax.tree.map(lambda _: jax.sharding.make_single_device_sharding(jax.devices()[0]), params)
    restored = ckpt.restore_params(str(exported / "run"), 0, cfg, shardings=shardings)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))


def test_stacked_leaves_are_stored_one_chunk_per_layer(exported):
    source = OrbaxSource(exported / "run")
    for path, meta in source._meta.items():
        if path.startswith("layers/"):
            assert meta.storage.chunk_shape[0] == 1, path


@pytest.mark.torch
def test_exported_hf_directory_matches_phi3jax_logits_in_transformers(exported):
    import torch
    import transformers

    cfg, params, _ = ckpt.load_run(str(exported / "run"))
    ours = np.asarray(forward(params, cfg, [TOKENS]))
    model = transformers.AutoModelForCausalLM.from_pretrained(exported / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([TOKENS])).logits.numpy()
    # float32 both sides; 1e-4 absorbs summation-order differences between XLA and PyTorch.
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    gen = json.loads((exported / "out" / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {32000, 32007}


@pytest.fixture(scope="module")
def auto_tokenizer(exported):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(exported / "out")


def test_exported_tokenizer_files(exported):
    names = set(os.listdir(exported / "out"))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((exported / "out" / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert decoder["32007"] == {"content": "<|end|>", "lstrip": False, "normalized": False, "rstrip": True,
                                "single_word": False, "special": True}
    assert decoder["32000"]["rstrip"] is False  # <|endoftext|> keeps the whitespace after it
    assert config["chat_template"] == Tokenizer.load(str(exported / "run")).chat_template


def test_auto_tokenizer_reproduces_the_47_reference_tokenisations(exported, auto_tokenizer):
    tok = Tokenizer.load(str(exported / "run"))
    for text, ids in reference_tokenisations():
        assert auto_tokenizer(text, add_special_tokens=False)["input_ids"] == ids == tok.encode(text), text
        assert auto_tokenizer(text)["input_ids"] == tok.encode(text, add_bos=True), text


def test_auto_tokenizer_renders_and_encodes_chats_as_phi3jax(exported, auto_tokenizer):
    tok = Tokenizer.load(str(exported / "run"))
    for conv in CONVERSATIONS:
        for prompt in (True, False):
            text = tok.apply_chat_template(conv, add_generation_prompt=prompt)
            assert auto_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt) == text
            ids = auto_tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert list(ids) == tok.encode(text), text
            assert ids[0] == tok.bos_id != ids[1]  # BOS once, from the template


def test_a_checkpoints_own_chat_template_is_carried_through(tmp_path):
    # The original Phi-3-mini template (llama.cpp's vocab file has it): system turns dropped.
    import transformers

    from phi3jax.convert.hf_tokenizer import save_hf_tokenizer

    original = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
                "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
                "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}"
                "{% endfor %}")
    make_phi3_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": original, "model_max_length": 4096, "padding_side": "left",
        "added_tokens_decoder": {str(t.id): {"content": t.content, "rstrip": t.rstrip, "special": t.special}
                                 for t in Tokenizer.phi3(tmp_path / "hf" / "tokenizer.model").added}}))
    hf_to_orbax(tmp_path / "hf", tmp_path / "run")
    os.makedirs(tmp_path / "tok")
    save_hf_tokenizer(str(tmp_path / "run"), str(tmp_path / "tok"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    conv = CONVERSATIONS[1]
    rendered = Tokenizer.load(str(tmp_path / "run")).apply_chat_template(conv, add_generation_prompt=False)
    assert "<|system|>" not in rendered
    assert auto.apply_chat_template(conv, tokenize=False) == rendered
    assert auto.padding_side == "left"  # the source's other settings survive


def test_exported_tokenizer_of_a_trained_sentencepiece_model(tmp_path):
    """A run directory's own SentencePiece model (user-defined chat tokens, as train.py makes them)."""
    import sentencepiece as spm
    import transformers

    from phi3jax.convert.hf_tokenizer import save_hf_tokenizer

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "42", "x=y+1;", "日本"]
    lines = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=320,
        model_type="bpe", byte_fallback=True, user_defined_symbols=["<|user|>", "<|assistant|>", "<|end|>",
                                                                     "<|endoftext|>"], minloglevel=2)
    os.makedirs(tmp_path / "out")
    save_hf_tokenizer(str(tmp_path), str(tmp_path / "out"))
    tok = Tokenizer.load(str(tmp_path / "tokenizer.model"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    texts = [*lines[:20], "  leading  and trailing  ", "unseen ☃ chars\n\ttab", "<|user|>\n hi <|end|>\n",
             "a<|endoftext|> b", "<unk> and <s> are single tokens", ""]
    for text in texts:
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text


# ------------------------------------------------------------------------------ BOS conventions
def _phi3_tokenizer_config(directory, **extra) -> None:
    """A tokenizer_config.json as Phi-3's hub checkpoints have it (added tokens, LlamaTokenizer)."""
    added = Tokenizer.phi3(directory / "tokenizer.model").added
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>", "legacy": False, **extra,
        "added_tokens_decoder": {str(t.id): {"content": t.content, "rstrip": t.rstrip, "special": t.special}
                                 for t in added}}))


def _auto_tokenizer_ids(directory, text: str) -> list[int]:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_an_export_keeps_its_sources_bos_convention(tmp_path, add_bos):
    """HF source (add_bos_token false as Phi-3's hub tokenizers, or true) -> run -> HF: AutoTokenizer, and
    so lm-evaluation-harness, TRL and vLLM, prepend BOS exactly as they do for the source."""
    make_phi3_hf_dir(tmp_path / "hf")
    _phi3_tokenizer_config(tmp_path / "hf", add_bos_token=add_bos, add_eos_token=False)
    hf_to_orbax(tmp_path / "hf", tmp_path / "run")
    orbax_to_hf(tmp_path / "run", tmp_path / "out", dtype="float32")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is add_bos
    ids = Tokenizer.load(str(tmp_path / "run")).encode("Hello world")
    assert _auto_tokenizer_ids(tmp_path / "out", "Hello world") == ([1] if add_bos else []) + ids
    # The exported tokenizer.json alone (as tokenizers-only tools read it) agrees.
    from tokenizers import Tokenizer as FastTokenizer

    fast = FastTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert fast.encode("Hello world").ids == ([1] if add_bos else []) + ids


def test_an_export_of_a_model_trained_from_scratch_adds_bos_and_keeps_it(tmp_path, phi3_vocab):
    """train.py's models train with BOS before every document (data.add_bos, default true): their
    export says add_bos_token true, and converting that export back and out again keeps it."""
    cfg = Phi3Config.preset("tiny", vocab_size=32064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            pad_token_id=32000, eos_token_id=32000)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(a.dtype), abstract_params(cfg))
    run = tmp_path / "run"
    os.makedirs(run)
    # What train.py writes: the resolved config (data section, no init_from) and its tokenizer.
    ckpt.write_yaml(str(run / ckpt.CONFIG_FILE), {"model": ckpt.model_fields(cfg), "init_from": None,
                                                  "data": {"format": "text", "add_bos": True, "add_eos": True}})
    (run / "tokenizer.model").write_bytes((phi3_vocab / "tokenizer.model").read_bytes())
    ckpt.save_params(str(run), 3, params, cfg)
    orbax_to_hf(run, tmp_path / "out", dtype="float32")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is True
    ids = Tokenizer.load(str(run)).encode("Hello world")
    assert _auto_tokenizer_ids(tmp_path / "out", "Hello world") == [1, *ids]
    hf_to_orbax(tmp_path / "out", tmp_path / "run2")
    orbax_to_hf(tmp_path / "run2", tmp_path / "out2", dtype="float32")
    assert _auto_tokenizer_ids(tmp_path / "out2", "Hello world") == [1, *ids]


def test_bos_convention_of_run_directories(tmp_path, phi3_vocab):
    from phi3jax.convert.hf_tokenizer import bos_convention

    def run(name, config, tokenizer_config=None):
        directory = tmp_path / name
        os.makedirs(directory)
        ckpt.write_yaml(str(directory / ckpt.CONFIG_FILE), {"model": {}, **config})
        if tokenizer_config is not None:
            (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        return str(directory)

    # From scratch: what it was trained with, whatever tokenizer files it was given.
    assert bos_convention(run("scratch", {"data": {"add_bos": False}}, {"add_bos_token": True}))[0] is False
    assert bos_convention(run("scratch_default", {"data": {}}))[0] is True
    # Fine-tuned from a hub checkpoint: the source's convention (its tokenizer_config.json, copied).
    tuned = run("tuned", {"init_from": "hf:/models/phi3", "data": {"add_bos": True}}, {"add_bos_token": False})
    adds, why = bos_convention(tuned)
    assert adds is False and "add_bos_token false" in why
    # Converted by hf-to-orbax from a directory that states nothing: transformers' Llama default.
    assert bos_convention(run("converted", {}))[0] is True


# ------------------------------------------------------------------------- added_tokens.json
def test_a_source_declaring_its_added_tokens_only_in_added_tokens_json_converts(tmp_path):
    """Issue 20: `<|endoftext|>` (eos = pad = 32000) only in added_tokens.json, a valid HF layout."""
    make_phi3_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<unk>"}))
    (tmp_path / "hf" / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 32000}))
    tok = Tokenizer.load(str(tmp_path / "hf"))
    assert tok.eos_id == tok.pad_id == 32000 and tok.vocab_size == 32064
    hf_to_orbax(tmp_path / "hf", tmp_path / "run")
    orbax_to_hf(tmp_path / "run", tmp_path / "out", dtype="float32")
    import transformers

    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert auto.eos_token_id == auto.pad_token_id == auto.convert_tokens_to_ids("<|endoftext|>") == 32000
    assert auto.bos_token_id == 1 and auto.unk_token_id == 0
    text = "Hello world<|endoftext|> again"
    assert auto(text)["input_ids"] == Tokenizer.load(str(tmp_path / "run")).encode(text) == tok.encode(text)
    assert 32000 in tok.encode(text)


def test_added_tokens_json_that_contradicts_tokenizer_config_is_named(tmp_path, phi3_vocab):
    from phi3jax.tokenizer import TokenizerError

    (tmp_path / "tokenizer.model").write_bytes((phi3_vocab / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"32000": {"content": "<|endoftext|>", "special": True}}}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 32001}))
    with pytest.raises(TokenizerError, match=r"added_tokens\.json gives '<\|endoftext\|>' id 32001"):
        Tokenizer.load(str(tmp_path))
