"""Chat fine-tuning data: exactly the assistant replies and their closing <|end|> carry loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from phi3jax.tokenizer import Tokenizer
from phi3jax.train import data

CONVERSATION = [
    {"role": "system", "content": "You are a terse Python tutor."},
    {"role": "user", "content": "What does `pass` do?"},
    {"role": "assistant", "content": "Nothing: it is a placeholder statement."},
    {"role": "user", "content": "And `break`?"},
    {"role": "assistant", "content": "It leaves the innermost loop.\nUse it sparingly."},
]
END, ASSISTANT, USER, SYSTEM = 32007, 32001, 32010, 32006


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_vocab):
    return Tokenizer.phi3(phi3_vocab / "tokenizer.model")


def _counted(example):
    return example["targets"][example["loss_mask"] > 0].tolist()


def test_exactly_the_assistant_replies_and_their_end_tokens_carry_loss(phi3_tokenizer):
    tok = phi3_tokenizer
    example = data.Tokenize(tok).map(CONVERSATION)
    # The rendered conversation, as the Phi-3.5 template writes it.
    ids = [int(i) for i in np.concatenate([example["inputs"][:1], example["targets"]])]
    assert tok.decode(ids) == ("<s><|system|>You are a terse Python tutor.<|end|><|user|>What does `pass` do?<|end|>"
                               "<|assistant|>Nothing: it is a placeholder statement.<|end|><|user|>And `break`?"
                               "<|end|><|assistant|>It leaves the innermost loop.\nUse it sparingly.<|end|>")
    # Expected loss tokens, built independently: each reply's tokens (encoded right after <|assistant|>\n,
    # whose rstrip swallows the newline) followed by <|end|>.
    expected = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            expected += tok.encode("<|assistant|>\n" + m["content"] + "<|end|>")[1:]
    assert _counted(example) == expected
    assert _counted(example).count(END) == 2 and ids.count(END) == 5  # system and user <|end|> carry no loss
    assert not {ASSISTANT, USER, SYSTEM} & set(_counted(example))
    replies = tok.decode(_counted(example))
    assert replies == ("Nothing: it is a placeholder statement.<|end|>"
                       "It leaves the innermost loop.\nUse it sparingly.<|end|>")


def test_the_mask_survives_reading_and_packing(tmp_path, phi3_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": CONVERSATION[k:]}) for k in (0, 1, 3)) + "\n")
    docs = data.read_documents(str(path), "chat")
    rows = data.eval_batches(docs, np.arange(len(docs)), phi3_tokenizer, seq_len=256, batch_size=1,
                             split_documents=False)
    packed = [t for b in rows for t in b["targets"][b["loss_mask"] > 0].tolist()]
    alone = [t for d in docs for t in _counted(data.Tokenize(phi3_tokenizer).map(d))]
    assert packed == alone and packed.count(END) == 2 + 2 + 1


def test_a_conversation_without_assistant_turns_carries_no_loss(phi3_tokenizer):
    example = data.Tokenize(phi3_tokenizer).map([{"role": "user", "content": "hello"}])
    assert example["loss_mask"].sum() == 0


def test_the_checkpoints_chat_template_is_used_when_it_has_one(tmp_path, phi3_vocab):
    import shutil

    shutil.copy(phi3_vocab / "tokenizer.model", tmp_path / "tokenizer.model")
    added = {str(i): {"content": c, "special": True, "rstrip": i != 32000}
             for i, c in {32000: "<|endoftext|>", 32001: "<|assistant|>", 32007: "<|end|>", 32010: "<|user|>"}.items()}
    # The original Phi-3-mini template: system turns are dropped.
    template = ("{{ bos_token }}{% for message in messages %}{% if message['role'] in ['user', 'assistant'] %}"
                "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added,
                                                                "chat_template": template}))
    tok = Tokenizer.load(tmp_path)
    example = data.Tokenize(tok).map(CONVERSATION)
    assert SYSTEM not in example["inputs"].tolist()
    assert tok.decode(_counted(example)).count("<|end|>") == 2
