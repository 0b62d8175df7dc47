"""Tokenizer: the real Phi-3 vocabulary's reference tokenisations, added tokens, the chat template."""

from __future__ import annotations

import json
import shutil

import pytest

from phi3jax.tokenizer import Tokenizer, TokenizerError


def reference_cases(vocab_dir):
    texts = (vocab_dir / "ggml-vocab-phi-3.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (vocab_dir / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids, strict=False)]


def test_all_47_reference_tokenisations(phi3_vocab):
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    cases = reference_cases(phi3_vocab)
    assert len(cases) == 47
    wrong = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not wrong


def test_bare_phi3_model_gets_phi3_added_tokens(phi3_vocab):
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    assert tok.vocab_size == 32064 and tok.bos_id == 1 and tok.eos_id == 32000
    assert tok.stop_ids == (32007, 32000)
    assert tok.encode("<|user|>\nHi<|end|>\n<|endoftext|>") == [32010, 6324, 32007, 32000]


def test_chat_template_renders_and_masks_assistant_replies_with_their_end(phi3_vocab):
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert text == ("<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n"
                    "<|user|>\nBye<|end|>\n<|assistant|>\nSee you.<|end|>\n")
    ids, mask = tok.encode_chat(messages)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert trained == tok.encode("Hello!") + [32007] + tok.encode("See you.") + [32007]
    assert ids[0] == 1 and not mask[0]


def test_unknown_role_is_a_clear_error(phi3_vocab):
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    with pytest.raises(TokenizerError, match="unknown role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_directory_tokenizer_config_supplies_added_tokens_and_template(phi3_vocab, tmp_path):
    shutil.copy(phi3_vocab / "tokenizer.model", tmp_path / "tokenizer.model")
    config = {"added_tokens_decoder": {"32000": {"content": "<|endoftext|>", "special": True, "rstrip": False},
                                       "32007": {"content": "<|end|>", "special": True, "rstrip": True},
                                       "32010": {"content": "<|user|>", "special": True, "rstrip": True}},
              "chat_template": "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "Yo"}]) == "<|user|>Yo<|end|>"
    assert tok.vocab_size == 32064 and tok.stop_ids == (32007, 32000)


def test_decode_round_trips_text_and_special_tokens(phi3_vocab):
    tok = Tokenizer.load(phi3_vocab / "tokenizer.model")
    ids = tok.encode("Hello, world!<|end|>")
    assert tok.decode(ids) == "Hello, world!<|end|>"
    assert tok.decode(ids, skip_special=True) == "Hello, world!"
