"""SentencePiece tokenizer with Phi-3's added tokens and chat template.

Phi-3's vocabulary is the Llama-2 SentencePiece model (32000 pieces) plus added tokens
handled above SentencePiece (32000 `<|endoftext|>`, 32001 `<|assistant|>`, ..., 32010
`<|user|>`; ids up to 32063 are unused padding). Encoding follows the Phi-3 fast tokenizer
that `transformers.AutoTokenizer` loads:

  * text is split on added/special token strings (longest match first);
  * a token marked `rstrip` swallows the whitespace after it (all chat tokens except
    `<|endoftext|>` are, per Phi-3's tokenizer_config.json);
  * every piece of plain text between them is encoded by SentencePiece on its own, with
    SentencePiece's dummy-prefix space.

A run directory's tokenizer (trained by train.py) carries the chat tokens as user-defined
pieces inside the SentencePiece model; they are treated the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jinja2
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2

CHAT_ROLES = ("system", "user", "assistant")

# The Phi-3.5 form; it also renders the original Phi-3 conversations (without system turns).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool = True
    rstrip: bool = False
    lstrip: bool = False


def phi3_added_tokens() -> list[AddedToken]:
    """Phi-3 / Phi-3.5's added tokens as their tokenizer_config.json declares them."""
    names = {32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>",
             32003: "<|placeholder2|>", 32004: "<|placeholder3|>", 32005: "<|placeholder4|>",
             32006: "<|system|>", 32007: "<|end|>", 32008: "<|placeholder5|>",
             32009: "<|placeholder6|>", 32010: "<|user|>"}
    return [AddedToken(c, i, special=True, rstrip=i != 32000) for i, c in names.items()]


PHI3_VOCAB_SIZE = 32064


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or text that cannot be encoded as asked."""


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _tokens_of_added_tokens_json(path: str, declared: Sequence[AddedToken]) -> list[AddedToken]:
    """The tokens of added_tokens.json ({content: id}) that `declared` (tokenizer_config.json's
    added_tokens_decoder) lacks. Phi-3's own tokens keep Phi-3's flags; any other is special."""
    by_content = {t.content: t for t in declared}
    by_id = {t.id: t for t in declared}
    phi3 = {(t.content, t.id): t for t in phi3_added_tokens()}
    out = []
    for content, i in _read_json(path).items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"{path}: token {content!r} has id {i!r}; ids must be non-negative integers")
        known = by_content.get(content) or by_id.get(i)
        if known is not None and (known.content, known.id) != (content, i):
            raise TokenizerError(f"{path} gives {content!r} id {i}, but tokenizer_config.json's "
                                 f"added_tokens_decoder has {known.content!r} as id {known.id}; make the two agree")
        if known is None:
            out.append(phi3.get((content, i), AddedToken(content, i, special=True)))
    return out


class Tokenizer:
    """Encode/decode text and render chats for a Phi-3 model."""

    def __init__(self, sp_model: str | os.PathLike, added_tokens: Sequence[AddedToken] = (),
                 chat_template: str | None = None, vocab_size: int | None = None):
        path = os.fspath(sp_model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SentencePiece model at {path!r}")
        self.sp_model_path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        added = {t.content: t for t in added_tokens}
        # Control pieces (<s>, </s>) and the unknown piece (<unk>) are special, as in Phi-3's fast
        # tokenizer (the text "<unk>" is token 0); user-defined pieces (train.py's chat tokens)
        # behave like Phi-3's added tokens.
        proto = sp_model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        for i, piece in enumerate(proto.pieces):
            if piece.piece in added:
                continue
            if piece.type in (piece.CONTROL, piece.UNKNOWN):
                added[piece.piece] = AddedToken(piece.piece, i, special=True)
            elif piece.type == piece.USER_DEFINED:
                added[piece.piece] = AddedToken(piece.piece, i, special=True,
                                                rstrip=piece.piece != "<|endoftext|>")
        self.added = sorted(added.values(), key=lambda t: t.id)
        self._by_content = {t.content: t for t in self.added}
        self._by_id = {t.id: t for t in self.added}
        pattern = "|".join(re.escape(c) for c in sorted(self._by_content, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._template = jinja2.Environment(keep_trailing_newline=True).from_string(self.chat_template)
        top = max([self.sp.get_piece_size() - 1, *self._by_id])
        self.vocab_size = vocab_size if vocab_size is not None else top + 1
        if self.vocab_size <= top:
            raise TokenizerError(f"vocab_size {self.vocab_size} is smaller than the largest token id {top}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def phi3(cls, sp_model: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
        """The Phi-3 tokenizer from its `tokenizer.model` (added tokens are Phi-3's)."""
        return cls(sp_model, phi3_added_tokens(), chat_template, vocab_size=PHI3_VOCAB_SIZE)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a `tokenizer.model` file, a run directory, or a Hugging Face model directory.

        A HF directory's tokenizer_config.json supplies the added tokens (with their rstrip
        flags) and the chat template; added_tokens.json ({content: id}, the older layout) adds
        the tokens it names. A bare Phi-3 `tokenizer.model` (32000 pieces) gets Phi-3's added
        tokens.
        """
        path = os.fspath(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        model = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no tokenizer.model in {path!r}; a run directory or Hugging Face "
                                    "directory must hold the SentencePiece model")
        config_file = os.path.join(directory, "tokenizer_config.json")
        added_file = os.path.join(directory, "added_tokens.json")
        if os.path.isfile(config_file) or os.path.isfile(added_file):
            config = _read_json(config_file) if os.path.isfile(config_file) else {}
            added = [AddedToken(t["content"], int(i), bool(t.get("special", True)), bool(t.get("rstrip", False)),
                                bool(t.get("lstrip", False)))
                     for i, t in config.get("added_tokens_decoder", {}).items()]
            if os.path.isfile(added_file):
                added += _tokens_of_added_tokens_json(added_file, added)
            template = config.get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            vocab = None
            if any(t.content == "<|endoftext|>" and t.id == 32000 for t in added):
                vocab = PHI3_VOCAB_SIZE
            return cls(model, added, template, vocab_size=vocab)
        sp = spm.SentencePieceProcessor(model_file=model)
        if sp.get_piece_size() == 32000 and sp.piece_to_id("<|endoftext|>") == sp.unk_id():
            return cls.phi3(model)
        return cls(model)

    # ------------------------------------------------------------------- ids
    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End of text: `<|endoftext|>` when the vocabulary has it, else SentencePiece's eos."""
        tok = self._by_content.get("<|endoftext|>")
        return tok.id if tok else self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.eos_id if self.sp.pad_id() < 0 else self.sp.pad_id()

    def token_id(self, content: str) -> int:
        tok = self._by_content.get(content)
        if tok is None:
            raise TokenizerError(f"{content!r} is not a special token of this tokenizer")
        return tok.id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generated reply: `<|end|>` and `<|endoftext|>` where present."""
        ids = [self._by_content[c].id for c in ("<|end|>", "<|endoftext|>") if c in self._by_content]
        return tuple(ids) or (self.sp.eos_id(),)

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (added/special token strings become their ids)."""
        ids = [self.bos_id] if add_bos else []
        pieces = self._split.split(text) if self._split else [text]
        strip_next = False
        for k, piece in enumerate(pieces):
            if k % 2 == 1:  # an added-token string
                tok = self._by_content[piece]
                ids.append(tok.id)
                strip_next = tok.rstrip
                continue
            if strip_next:
                piece = piece.lstrip()
            nxt = self._by_content.get(pieces[k + 1]) if k + 1 < len(pieces) else None
            if nxt is not None and nxt.lstrip:
                piece = piece.rstrip()
            if piece:
                ids.extend(self.sp.encode(piece))
            strip_next = False
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids` (a list or a 1-D array); added tokens render as their strings unless skip_special."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if getattr(i, "ndim", 0) != 0 or isinstance(i, Sequence):
                raise TokenizerError("decode takes one sequence of token ids, not a batch: decode each row, e.g. "
                                     "[tok.decode(row) for row in generate(...)]")
            i = int(i)
            tok = self._by_id.get(i)
            if tok is None and i < self.sp.get_piece_size():
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if tok is not None and not (skip_special and tok.special):
                out.append(tok.content)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # -------------------------------------------------------------------- chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role": ..., "content": ...}, ...]) with the chat template."""
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
            if m["role"] not in CHAT_ROLES:
                raise TokenizerError(f"message {k} has unknown role {m['role']!r}; use one of {CHAT_ROLES}")
            if not isinstance(m["content"], str):
                raise TokenizerError(f"message {k} content must be a string, got {type(m['content']).__name__}")
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.sp.id_to_piece(self.bos_id),
                                     eos_token=self.decode([self.eos_id]))

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """Token ids of a rendered conversation and a mask marking each assistant reply's tokens
        (its content and the `<|end|>` that closes it): the tokens a chat fine-tune trains on."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))
        mask = [False] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self.encode(self.apply_chat_template(messages[:k], add_generation_prompt=True))
            end = self.encode(self.apply_chat_template(messages[: k + 1], add_generation_prompt=False))
            if ids[: len(start)] != start or ids[: len(end)] != end:
                raise TokenizerError("the chat template does not render conversations prefix by prefix; "
                                     "cannot locate assistant turns for the loss mask")
            for j in range(len(start), len(end)):
                mask[j] = True
        return ids, mask
