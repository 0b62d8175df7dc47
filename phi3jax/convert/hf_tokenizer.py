"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json + special_tokens_map.json +
tokenizer.model) that reproduces `phi3jax.tokenizer.Tokenizer` through `transformers.AutoTokenizer`.

Why not let transformers build it from tokenizer.model: transformers 5 rebuilds a `LlamaTokenizer`
with a Metaspace pre-tokenizer that puts the dummy-prefix space only before the first piece and
merges differently around whitespace; it gets 15 of the 47 reference Phi-3 tokenisations wrong.
So the fast tokenizer is written out in full and declared as `PreTrainedTokenizerFast`, which
transformers (4.x and 5.x) loads as it is:

* model: SentencePiece's BPE (or Unigram) vocabulary with byte fallback; BPE merges are derived
  from the piece scores (a pair merges with the rank of the piece it forms), which is exactly
  SentencePiece's "merge the highest-scoring pair" rule;
* normalizer: SentencePiece's own (charsmap, whitespace), then the dummy prefix and `▁` for spaces.
  Added tokens are matched on the raw text first, so every plain-text piece between them gets its
  own dummy prefix, and rstrip tokens swallow the whitespace after them: Tokenizer.encode's rules;
* added tokens: `Tokenizer.added` with their ids, special and rstrip/lstrip flags;
* post-processor: BOS first, as `Tokenizer.encode(add_bos=True)`, or nothing, matching
  tokenizer_config.json's `add_bos_token`.

BOS: an export behaves in HF tooling (AutoTokenizer, so lm-evaluation-harness, TRL, vLLM) as the
model it came from (`bos_convention`): a model from a Hugging Face checkpoint keeps its source's
`add_bos_token` (Phi-3's hub tokenizers say false: no BOS), and so does a fine-tune of one; a model
trained from scratch by train.py says what it was trained with (`data.add_bos`, true by default).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from phi3jax.config import Phi3Config
from phi3jax.tokenizer import Tokenizer
from phi3jax.train import checkpoint as ckpt

TOKENIZER_CLASS = "PreTrainedTokenizerFast"


class TokenizerExportError(ValueError):
    """A tokenizer that cannot be exported as asked."""


def _proto(tok: Tokenizer) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2

    proto = sp_model_pb2.ModelProto()
    with open(tok.sp_model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merges for a SentencePiece BPE vocabulary [(piece, score, type)]: every split of a normal
    piece into two pieces of the vocabulary, ranked by the score of the piece it forms (ties: by id)."""
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != 1:  # only NORMAL pieces are formed by merging
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def build_tokenizer_json(tok: Tokenizer, add_bos: bool = True) -> Any:
    """A `tokenizers.Tokenizer` equivalent to `tok` (see the module docstring); its post-processor
    prepends BOS when `add_bos`."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    proto = _proto(tok)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = pieces[proto.trainer_spec.unk_id][0]
    byte_fallback = proto.trainer_spec.byte_fallback
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    for added in tok.added:  # ids above SentencePiece's, e.g. Phi-3's 32000-32010
        if added.id >= len(pieces):
            vocab[added.content] = added.id
    if proto.trainer_spec.model_type == proto.trainer_spec.BPE:
        model = models.BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=unk, fuse_unk=True,
                           byte_fallback=byte_fallback)
    elif proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
        if len(vocab) != len(pieces):
            raise TokenizerExportError("a Unigram SentencePiece model with added tokens beyond its pieces is not "
                                       "supported; add them as user-defined pieces when training it")
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], proto.trainer_spec.unk_id,
                               byte_fallback)
    else:
        raise TokenizerExportError(f"SentencePiece model type {proto.trainer_spec.model_type} is not supported "
                                   "(BPE and Unigram are)")
    fast = FastTokenizer(model)

    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    fast.normalizer = normalizers.Sequence(steps)
    fast.pre_tokenizer = None  # SentencePiece encodes the whole normalised piece at once
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      *([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])])
    fast.add_special_tokens([AddedToken(t.content, single_word=False, lstrip=t.lstrip, rstrip=t.rstrip,
                                        normalized=False, special=t.special) for t in tok.added])
    if add_bos:
        bos = token_content(tok, tok.bos_id)
        fast.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    else:  # what transformers writes for a Llama tokenizer with add_bos_token false
        fast.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    for t in tok.added:
        if fast.token_to_id(t.content) != t.id:
            raise TokenizerExportError(f"added token {t.content!r} would get id {fast.token_to_id(t.content)} "
                                       f"instead of {t.id}")
    return fast


def token_content(tok: Tokenizer, i: int) -> str:
    """The text of token id i: an added token's content, else its SentencePiece piece."""
    content = next((t.content for t in tok.added if t.id == i), None)
    if content is not None:
        return content
    if not 0 <= i < tok.sp.get_piece_size():
        raise TokenizerExportError(f"token id {i} is neither a SentencePiece piece (0-{tok.sp.get_piece_size() - 1}) "
                                   "nor an added token")
    return tok.sp.id_to_piece(i)


def unk_id(tok: Tokenizer) -> int:
    """The unknown piece's id (SentencePiece reports -1 when that piece is typed CONTROL, as in the
    Phi-3 vocabulary rebuilt from llama.cpp's GGUF)."""
    return tok.sp.unk_id() if tok.sp.unk_id() >= 0 else _proto(tok).trainer_spec.unk_id


def special_tokens(tok: Tokenizer, cfg: Phi3Config | None = None) -> dict[str, str]:
    pad_id = cfg.pad_token_id if cfg is not None and cfg.pad_token_id is not None else tok.pad_id
    return {"bos_token": token_content(tok, tok.bos_id), "eos_token": token_content(tok, tok.eos_id),
            "unk_token": token_content(tok, unk_id(tok)), "pad_token": token_content(tok, pad_id)}


def check_special_ids(tok: Tokenizer, cfg: Phi3Config, directory: str) -> None:
    """Every special id the model config names (bos, eos, pad) must be a token of `tok`."""
    pieces = tok.sp.get_piece_size()
    added = {t.id for t in tok.added}
    named = [("bos_token_id", cfg.bos_token_id), *(("eos_token_id", e) for e in cfg.eos_token_id),
             ("pad_token_id", cfg.pad_token_id)]
    for name, i in named:
        if i is not None and not (0 <= i < pieces or i in added):
            beyond = sorted(a for a in added if a >= pieces)
            raise TokenizerExportError(
                f"{directory}: the model config's {name} {i} is not a token of its tokenizer ({pieces} SentencePiece "
                f"pieces, added tokens {beyond or 'none'} above them); declare it in tokenizer_config.json's "
                "added_tokens_decoder or in added_tokens.json, or fix the id")


def bos_convention(directory: str) -> tuple[bool, str]:
    """(whether HF tooling prepends BOS for the model in `directory`, a run or HF directory; why).

    A run trained from scratch by train.py: its `data.add_bos`, how it was trained. Otherwise the
    `add_bos_token` of tokenizer_config.json (an HF checkpoint's own, or the copy a converted or
    fine-tuned run keeps); where unstated, true: transformers' Llama tokenizer, which a bare
    tokenizer.model loads as, adds BOS by default.
    """
    run_config = os.path.join(directory, ckpt.CONFIG_FILE)
    if os.path.isfile(run_config):
        run = ckpt.read_run_config(directory)
        if isinstance(run.get("data"), dict) and not run.get("init_from"):
            add = bool(run["data"].get("add_bos", True))
            return add, f"trained from scratch with data.add_bos {json.dumps(add)} ({run_config})"
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            value = json.load(f).get("add_bos_token")
        if isinstance(value, bool):
            return value, f"add_bos_token {json.dumps(value)} in {config_file}"
    return True, f"{directory} states no add_bos_token; transformers' Llama tokenizer adds BOS by default"


def tokenizer_config(tok: Tokenizer, cfg: Phi3Config | None = None, base: dict[str, Any] | None = None,
                     add_bos: bool = True) -> dict[str, Any]:
    """tokenizer_config.json: `base` (the source's own, if any) with every key that decides
    tokenisation replaced by `tok`'s, and `add_bos_token` set to `add_bos`."""
    out = {k: v for k, v in (base or {}).items()
           if k not in ("tokenizer_class", "auto_map", "legacy", "add_prefix_space", "sp_model_kwargs",
                        "use_default_system_prompt", "spaces_between_special_tokens")}
    out.update(special_tokens(tok, cfg))
    out.update({
        "tokenizer_class": TOKENIZER_CLASS,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": tok.chat_template,
        "added_tokens_decoder": {str(t.id): {"content": t.content, "lstrip": t.lstrip, "normalized": False,
                                             "rstrip": t.rstrip, "single_word": False, "special": t.special}
                                 for t in tok.added},
    })
    if cfg is not None:
        out["model_max_length"] = cfg.max_position_embeddings
    return out


def check_tokenizer_dir(directory: str) -> Tokenizer | None:
    """The directory's SentencePiece tokenizer, None when it has only a tokenizer.json (passed through
    as it is), with a warning when it has neither."""
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return Tokenizer.load(directory)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        print(f"phi3jax convert: warning: {directory} has no tokenizer (tokenizer.model or tokenizer.json); "
              "the output will have none", file=sys.stderr)
    return None


class HFTokenizerFiles:
    """The HF tokenizer files for the tokenizer in `src_dir` (a run or HF directory), built and
    checked in memory, so a `TokenizerExportError` comes before anything is written; `write` writes them.

    A SentencePiece tokenizer gets all four files, generated from `Tokenizer.load(src_dir)`, with
    the BOS convention of `bos_convention(src_dir)`; with `cfg`, the special ids it names are
    checked against the tokenizer first. A tokenizer with only a tokenizer.json (Phi-4-mini's BPE)
    is copied through unchanged.
    """

    PASSED_THROUGH = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "added_tokens.json")

    def __init__(self, src_dir: str, cfg: Phi3Config | None = None):
        self.src_dir = src_dir
        self.tok = check_tokenizer_dir(src_dir)
        if self.tok is None:
            return
        if cfg is not None:
            check_special_ids(self.tok, cfg, src_dir)
        base = None
        if os.path.isfile(os.path.join(src_dir, "tokenizer_config.json")):
            with open(os.path.join(src_dir, "tokenizer_config.json"), encoding="utf-8") as f:
                base = json.load(f)
        self.add_bos, _ = bos_convention(src_dir)
        self.fast = build_tokenizer_json(self.tok, self.add_bos)
        self.json_files = {"tokenizer_config.json": tokenizer_config(self.tok, cfg, base, self.add_bos),
                           "special_tokens_map.json": special_tokens(self.tok, cfg)}

    def write(self, out_dir: str) -> None:
        if self.tok is None:
            for name in self.PASSED_THROUGH:
                if os.path.isfile(os.path.join(self.src_dir, name)):
                    shutil.copyfile(os.path.join(self.src_dir, name), os.path.join(out_dir, name))
            return
        shutil.copyfile(self.tok.sp_model_path, os.path.join(out_dir, "tokenizer.model"))
        self.fast.save(os.path.join(out_dir, "tokenizer.json"))
        for name, obj in self.json_files.items():
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
                f.write("\n")


def save_hf_tokenizer(src_dir: str, out_dir: str, cfg: Phi3Config | None = None) -> None:
    """Write the HF tokenizer files for the tokenizer in `src_dir` into `out_dir` (see `HFTokenizerFiles`)."""
    HFTokenizerFiles(src_dir, cfg).write(out_dir)
