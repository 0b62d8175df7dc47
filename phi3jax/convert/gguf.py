"""GGUF export for llama.cpp (architecture `phi3`): f32, f16, q8_0 and q4_0.

What llama.cpp's Phi-3 loader expects (checked against its own Phi-3 converter and vocab file):

* tensors keep HF's fused layout, [out, in] (GGUF lists dims innermost first, so [in, out]):
  token_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up (gate then up), ffn_down},
  output_norm, output (absent when tied); norms always float32. LongRoPE adds the float32
  `rope_factors_long` / `rope_factors_short` and `rope.scaling.attn_factor`.
* a SentencePiece ("llama") vocabulary padded to the model's vocab_size: pieces with their scores
  and types, added tokens as control tokens (user-defined when not special), unused ids as
  `[PAD<id>]`, plus the special ids, the dummy-prefix flag and the chat template. Only a model
  llama.cpp tokenises as phi3jax is written (BPE, byte fallback, no normalisation:
  `check_llama_cpp_vocab`), under a name llama.cpp can load it with (`gguf_name`).
* q8_0 / q4_0 quantise blocks of 32 along each row (the `in` axis), with llama.cpp's own
  reference quantiser in the `gguf` package. Embedding and output are quantised like the rest.

Everything is planned (names, shapes, types, byte sizes) and validated before the file is
opened; tensors are then streamed from the source one at a time and quantised in row chunks.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.convert.files import progress_bar
from phi3jax.convert.hf import HFSource, ParamSource
from phi3jax.convert.hf_tokenizer import unk_id
from phi3jax.convert.keys import gguf_names, hf_shapes
from phi3jax.tokenizer import Tokenizer

QUANTS = ("f32", "f16", "q8_0", "q4_0")
ARCH = "phi3"
_ROW_CHUNK_ELEMENTS = 1 << 22  # quantise 4M values (16 MB of float32) at a time
# When general.name contains "phi3" or "phi-3", llama.cpp gives every special token the rstrip flag,
# then sets these four's by looking them up by name: a vocabulary without one of them fails to load
# ("error loading model vocabulary: unordered_map::at").
LLAMA_CPP_PHI3_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")
_PHI3_IN_NAME = re.compile(r"phi-?3", re.IGNORECASE)


class GGUFExportError(ValueError):
    """A model or tokenizer that cannot be exported to GGUF as asked."""


def _types(quant: str) -> tuple[Any, Any]:
    import gguf

    t, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (t.F32, f.ALL_F32), "f16": (t.F16, f.MOSTLY_F16), "q8_0": (t.Q8_0, f.MOSTLY_Q8_0),
            "q4_0": (t.Q4_0, f.MOSTLY_Q4_0)}[quant]


def tensor_plan(cfg: Phi3Config, quant: str) -> list[tuple[str, str | None, tuple[int, ...], Any]]:
    """[(GGUF name, HF name or None for derived tensors, numpy shape, GGML type)] in file order.

    Raises GGUFExportError, naming the tensor, when a row length cannot take the quant's blocks.
    """
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"unknown quant {quant!r}; use one of {QUANTS}")
    qtype, _ = _types(quant)
    plan: list[tuple[str, str | None, tuple[int, ...], Any]] = []
    if cfg.rope_type == "longrope":
        for which in ("long", "short"):
            plan.append((f"rope_factors_{which}.weight", None, (cfg.rotary_dim // 2,), gguf.GGMLQuantizationType.F32))
    names = gguf_names(cfg)
    for hf_name, shape in hf_shapes(cfg).items():
        ttype = qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        block, _ = gguf.GGML_QUANT_SIZES[ttype]
        if shape[-1] % block:
            raise GGUFExportError(f"tensor {hf_name} ({names[hf_name]}) has rows of {shape[-1]} values, not a "
                                  f"multiple of {quant}'s block of {block}; export it with --quant f16 or f32")
        plan.append((names[hf_name], hf_name, tuple(shape), ttype))
    return plan


def _nbytes(shape: tuple[int, ...], ttype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ttype]
    return int(np.prod(shape)) // block * size


class _Streamed:
    """What GGUFWriter.write_tensor_data needs of a tensor (nbytes, tofile), converting and
    quantising the source array a chunk of rows at a time as it is written."""

    def __init__(self, arr: np.ndarray, ttype: Any):
        self.arr, self.ttype = arr, ttype
        self.nbytes = _nbytes(arr.shape, ttype)

    def tofile(self, f: Any) -> None:
        import gguf

        rows = self.arr.reshape(-1, self.arr.shape[-1]) if self.arr.ndim > 1 else self.arr.reshape(1, -1)
        step = max(1, _ROW_CHUNK_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].astype(np.float32)
            if self.ttype == gguf.GGMLQuantizationType.F16:
                chunk = chunk.astype(np.float16)
            elif self.ttype != gguf.GGMLQuantizationType.F32:
                chunk = gguf.quants.quantize(chunk, self.ttype)
            np.ascontiguousarray(chunk).tofile(f)


# --------------------------------------------------------------------------- tokenizer
def load_sentencepiece_tokenizer(directory: str) -> Tokenizer:
    """The SentencePiece tokenizer of a run or HF directory; refuses a BPE tokenizer.json (Phi-4-mini)."""
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return Tokenizer.load(directory)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise GGUFExportError(
            f"{directory} has a tokenizer.json but no tokenizer.model: a BPE vocabulary such as Phi-4-mini's "
            "(tiktoken-style o200k, llama.cpp pre-tokenizer 'gpt-4o'). phi3jax exports only SentencePiece "
            "vocabularies to GGUF, the ones it can check token for token against llama.cpp; for Phi-4-mini use "
            "llama.cpp's own convert_hf_to_gguf.py on a Hugging Face directory (`phi3jax convert orbax-to-hf` "
            "writes one)")
    raise GGUFExportError(f"{directory} has no tokenizer.model; a GGUF file needs the model's vocabulary")


def sentencepiece_proto(tok: Tokenizer) -> Any:
    """The SentencePiece ModelProto of `tok`'s model file (pieces, trainer and normalizer specs)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2

    proto = sp_model_pb2.ModelProto()
    with open(tok.sp_model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def check_llama_cpp_vocab(tok: Tokenizer) -> None:
    """Refuse a SentencePiece model that llama.cpp would tokenise differently from phi3jax.

    llama.cpp's "llama" vocabulary is SentencePiece BPE: it merges the best-scoring pair of symbols
    until none forms a piece, spells leftover characters as byte pieces, escapes spaces to `▁`, adds
    the dummy-prefix space, and normalises nothing. So the model must be BPE with byte fallback,
    identity normalisation, and whitespace kept as it is (a run's tokenizer from train.py is).
    """
    proto = sentencepiece_proto(tok)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    where = f"{tok.sp_model_path} (SentencePiece)"
    retrain = ("export a model whose tokenizer is SentencePiece BPE with byte fallback and no normalisation: "
               "train.py trains one for a new run (a run from an older phi3jax has a unigram one: train it "
               "again), or give train.py such a model as data.tokenizer")
    if spec.model_type != spec.BPE:
        raise GGUFExportError(
            f"{where} is a {spec.ModelType.Name(spec.model_type)} model, but llama.cpp tokenises a GGUF vocabulary "
            f"with SentencePiece's BPE rule, so it would split text into other tokens than phi3jax; {retrain}")
    if not spec.byte_fallback:
        raise GGUFExportError(
            f"{where} has no byte fallback: phi3jax encodes a character outside the vocabulary as <unk>, llama.cpp "
            f"as byte pieces (<0x00>..<0xFF>), which this vocabulary lacks, so it aborts; {retrain}")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or spec.treat_whitespace_as_suffix:
        what = (f"normalises text (rule {norm.name!r})" if norm.precompiled_charsmap else
                "removes extra whitespace" if norm.remove_extra_whitespaces else "treats whitespace as a suffix")
        raise GGUFExportError(f"{where} {what}, which llama.cpp does not do, so it would tokenise such text "
                              f"differently; {retrain}")


def vocab_arrays(tok: Tokenizer, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, token types) for the GGUF header, padded to vocab_size as llama.cpp's
    converter pads Phi-3 (`[PAD<id>]`, score -10000, UNUSED). Refuses a vocabulary llama.cpp cannot
    reproduce (`check_llama_cpp_vocab`)."""
    from gguf import TokenType

    check_llama_cpp_vocab(tok)
    proto = sentencepiece_proto(tok)
    if tok.vocab_size > vocab_size:
        raise GGUFExportError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                              f"{vocab_size}; the embedding has no row for the extra ids")
    kinds = {proto.pieces[0].NORMAL: TokenType.NORMAL, proto.pieces[0].UNKNOWN: TokenType.UNKNOWN,
             proto.pieces[0].CONTROL: TokenType.CONTROL, proto.pieces[0].USER_DEFINED: TokenType.USER_DEFINED,
             proto.pieces[0].UNUSED: TokenType.UNUSED, proto.pieces[0].BYTE: TokenType.BYTE}
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, piece in enumerate(proto.pieces):
        tokens[i], scores[i], types[i] = piece.piece.encode("utf-8"), float(piece.score), int(kinds[piece.type])
    for t in tok.added:  # as llama.cpp's converter treats added_tokens_decoder
        tokens[t.id], scores[t.id] = t.content.encode("utf-8"), -1000.0
        types[t.id] = int(TokenType.CONTROL if t.special else TokenType.USER_DEFINED)
    return tokens, scores, types


def gguf_name(tok: Tokenizer, name: str) -> str:
    """general.name for a model called `name`, chosen for how llama.cpp reads it.

    A vocabulary with all of `LLAMA_CPP_PHI3_TOKENS`: `name`, prefixed "Phi3 " unless it says phi3
    or phi-3, so that llama.cpp strips the whitespace after the chat tokens as phi3jax does. One
    without them: `name` with phi3 / phi-3 spelled "Phi 3", so that the file loads; refused when
    phi3jax's tokenizer has tokens that strip whitespace, which llama.cpp then would not.
    """
    present = {p.piece for p in sentencepiece_proto(tok).pieces} | {t.content for t in tok.added}
    missing = [t for t in LLAMA_CPP_PHI3_TOKENS if t not in present]
    if not missing:
        return name if _PHI3_IN_NAME.search(name) else f"Phi3 {name}"
    stripping = [t.content for t in tok.added if t.rstrip or t.lstrip]
    if stripping:
        raise GGUFExportError(
            f"the vocabulary has no {' '.join(missing)}, which llama.cpp looks up by name in a model named Phi-3 "
            "(such a file fails to load), and in a model not named Phi-3 llama.cpp does not strip the whitespace "
            f"after {' '.join(stripping)} as phi3jax does; add {' '.join(missing)} to the tokenizer (train.py's "
            "tokenizer has them)")
    return _PHI3_IN_NAME.sub("Phi 3", name)


# ------------------------------------------------------------------------------ writing
def add_metadata(writer: Any, cfg: Phi3Config, tok: Tokenizer, quant: str, name: str = "Phi3") -> None:
    """Every header key of a phi3 GGUF file: hyperparameters, file type, vocabulary, chat template."""
    import gguf

    _, ftype = _types(quant)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # llama.cpp's Phi-3 converter: int(partial_rotary_factor * hidden) // heads.
    writer.add_rope_dimension_count(int(cfg.partial_rotary_factor * cfg.hidden_size) // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_sliding_window(cfg.sliding_window or 0)
    if cfg.rope_type == "longrope":
        # llama.cpp multiplies cos/sin by it for short and long factors alike, as HF does.
        writer.add_rope_scaling_attn_factors(cfg.rope_attention_scaling)
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, scores, types = vocab_arrays(tok, cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_add_space_prefix(bool(sentencepiece_proto(tok).normalizer_spec.add_dummy_prefix))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(unk_id(tok))
    writer.add_pad_token_id(cfg.pad_token_id if cfg.pad_token_id is not None else tok.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tok.chat_template)


def write_gguf(source: ParamSource, tok: Tokenizer, out: str | os.PathLike, quant: str = "f16",
               force: bool = False, progress: bool = False, name: str | None = None) -> str:
    """Write `source` as a GGUF file llama.cpp runs; returns its path.

    Validated (tokenizer, quant block sizes, output path) before anything is written; written to a
    temporary file beside `out` and renamed into place when complete. name: the model's name, made
    into general.name by `gguf_name` (default "model").
    """
    import gguf

    cfg = source.cfg
    out = os.path.abspath(os.fspath(out))
    plan = tensor_plan(cfg, quant)
    vocab_arrays(tok, cfg.vocab_size)  # validates the vocabulary against the model and llama.cpp
    name = gguf_name(tok, name or "model")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} already exists; choose another output or pass --force")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(writer, cfg, tok, quant, name)
        for gname, _, shape, ttype in plan:
            if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor_info(gname, shape, np.dtype(np.float32 if ttype == gguf.GGMLQuantizationType.F32
                                                              else np.float16), _nbytes(shape, ttype))
            else:
                writer.add_tensor_info(gname, gguf.quants.quant_shape_to_byte_shape(shape, ttype), np.dtype(np.uint8),
                                       _nbytes(shape, ttype), raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = progress_bar(len(plan), "gguf", progress)
        arrays = _arrays(source, cfg)
        for gname, hf_name, shape, ttype in plan:
            got_name, arr = next(arrays)
            if got_name != (hf_name or gname) or tuple(arr.shape) != shape:
                raise AssertionError(f"expected {hf_name or gname} {shape}, got {got_name} {arr.shape}")
            bar.set_postfix_str(gname, refresh=False)
            writer.write_tensor_data(_Streamed(arr, ttype))  # type: ignore[arg-type]
            del arr
            bar.update(1)
        bar.close()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


def _arrays(source: ParamSource, cfg: Phi3Config) -> Iterator[tuple[str, np.ndarray]]:
    if cfg.rope_type == "longrope":
        yield "rope_factors_long.weight", np.asarray(cfg.rope_long_factor, np.float32)
        yield "rope_factors_short.weight", np.asarray(cfg.rope_short_factor, np.float32)
    yield from source.hf_tensors()


def read_gguf_tensors(path: str | os.PathLike, cfg: Phi3Config) -> dict[str, np.ndarray]:
    """HF name -> float32 array (dequantised) of a phi3 GGUF file written by `write_gguf` for `cfg`:
    the weights llama.cpp actually computes with, for checking an export against phi3jax."""
    import gguf

    hf_of = {g: h for h, g in gguf_names(cfg).items()}
    reader = gguf.GGUFReader(os.fspath(path))
    out = {}
    for t in reader.tensors:
        if t.name.startswith("rope_factors"):
            continue
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[hf_of[t.name]] = np.asarray(data, np.float32).reshape([int(d) for d in reversed(t.shape)])
    return out


def to_gguf(out: str | os.PathLike, ckpt: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None,
            quant: str = "f16", force: bool = False, progress: bool = False, name: str | None = None) -> str:
    """A GGUF file from a run/step directory (`ckpt`) or a Hugging Face directory (`hf_dir`).

    name: the model's name (default: the directory's name), written as `gguf_name` makes it: llama.cpp
    gives Phi-3's chat tokens their rstrip behaviour only when general.name contains "phi3" or
    "phi-3", so it becomes "Phi3 <name>" where the vocabulary allows it.
    """
    if (ckpt is None) == (hf_dir is None):
        raise ValueError("pass exactly one of ckpt (a run or step directory) or hf_dir")
    if quant not in QUANTS:
        raise GGUFExportError(f"unknown quant {quant!r}; use one of {QUANTS}")
    if hf_dir is not None:
        source: ParamSource = HFSource(hf_dir)
        tokenizer_dir = os.fspath(hf_dir)
    else:
        from phi3jax.convert.orbax import OrbaxSource

        source = OrbaxSource(ckpt)
        tokenizer_dir = source.run_dir
    tok = load_sentencepiece_tokenizer(tokenizer_dir)
    name = name or os.path.basename(os.path.normpath(tokenizer_dir))
    if source.cfg.sliding_window:
        print(f"phi3jax convert: note: llama.cpp ignores Phi-3's sliding window ({source.cfg.sliding_window}); "
              "sequences longer than it attend further back than in phi3jax or transformers", file=sys.stderr)
    return write_gguf(source, tok, out, quant=quant, force=force, progress=progress, name=name)
