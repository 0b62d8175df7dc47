"""Data pipelines (grain): documents -> tokens -> packed rows -> per-process batches.

    source (text files | JSONL | ArrayRecord | chat JSONL)       documents, held out by seed
      -> shuffle(seed) per epoch, repeat; row r of every global batch is its own stream,
         documents r, r + B, r + 2B, ... of that order (B = the global batch size)
      -> tokenize (SentencePiece + added tokens; chat: template + assistant-only loss mask)
      -> pack into rows of seq_len with segment ids and positions (documents never attend
         to each other; a document longer than a row continues in the stream's next row)
      -> batch: the rows this process's devices hold, stacked

So the global batch at step k depends on (data, seed, k, global batch size, seq_len) only, not
on the number of processes or devices: a run continues on a larger or smaller slice with the same
data order. Each process tokenizes and packs only its own rows. Every stage is a grain dataset;
the iterator's position is one small JSON object per row (`RowStreams.get_state`), and the
checkpoint stores all rows' positions together (the global state), so a run saved by N processes
resumes in M.

A row is the batch format of `phi3jax.train.step`: `inputs`, `targets`, `loss_mask`,
`segment_ids` (1, 2, ... per document fragment; 0 = padding) and `positions` (restarting at 0
in each fragment). Inputs and targets are shifted *within* each document, so no target ever
crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from phi3jax.tokenizer import CHAT_ROLES, Tokenizer
from phi3jax.train.batch import BATCH_KEYS

CHAT_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
ARRAY_RECORD_EXTENSIONS = (".array_record", ".arrayrecord")


class DataError(ValueError):
    """Input data that cannot be read as the configured format."""


# ----------------------------------------------------------------------------- sources
# The built-in corpus: CPython 3.12.1's language reference topics (pydoc_data.topics, Python Software
# Foundation licence), shipped as a snapshot so that every Python version trains on the same text.
DEFAULT_CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pydoc_topics.json.gz")
DEFAULT_CORPUS_SHA256 = "a147dd399ca75e11a45344a96a0880279f4908ebfb529f7bcf9c591c8f147555"  # of the JSON


def default_corpus(chunk_chars: int = 2000) -> list[str]:
    """The built-in corpus: the Python language reference (79 topics of CPython 3.12.1's pydoc_data).

    Topics are cut at paragraph boundaries into documents of about `chunk_chars` characters, so a
    shuffled batch mixes many topics instead of holding a few long ones (0 keeps whole topics).
    """
    import gzip

    with open(DEFAULT_CORPUS_FILE, "rb") as f:
        raw = gzip.decompress(f.read())
    if hashlib.sha256(raw).hexdigest() != DEFAULT_CORPUS_SHA256:
        raise DataError(f"the built-in corpus {DEFAULT_CORPUS_FILE} is damaged (its SHA-256 is not "
                        f"{DEFAULT_CORPUS_SHA256}); reinstall phi3jax")
    topics = json.loads(raw)
    docs = []
    for name in sorted(topics):
        if not chunk_chars:
            docs.append(topics[name])
            continue
        current = ""
        for paragraph in topics[name].split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= chunk_chars:
                docs.append(current)
                current = ""
        if current.strip():
            docs.append(current)
    return docs


def default_corpus_identity() -> dict[str, Any]:
    """The built-in corpus as a data source in a run's data identity (`phi3jax.train.rundir`)."""
    return {"path": "built-in: " + os.path.basename(DEFAULT_CORPUS_FILE), "bytes": os.path.getsize(DEFAULT_CORPUS_FILE),
            "sha256": DEFAULT_CORPUS_SHA256}


def resolve_paths(path: str) -> list[str]:
    """The files `path` names: a file, every non-hidden file under a directory, or a glob's matches."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        if not files:
            raise DataError(f"data directory {path} holds no files")
        return files
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"data path {path!r} matches no file (give a file, a directory or a glob)")
    return files


def _is_array_record(path: str) -> bool:
    return path.endswith(ARRAY_RECORD_EXTENSIONS)


def _check_text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat record's messages, or a DataError saying what is wrong with them."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {k} must be an object with 'role' and 'content', got {m!r}")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: message {k} has unknown role {m['role']!r}; roles are {CHAT_ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {k} content must be a string")
    return messages


def _parse_record(raw: str, fmt: str, text_key: str, where: str) -> str | list[dict[str, str]]:
    """A document from one JSONL line / ArrayRecord record: text, or chat messages."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        if fmt == "array_record":  # ArrayRecord text datasets may store raw UTF-8 documents
            return raw
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                        "JSON object") from None
    if not isinstance(obj, dict):
        if fmt == "array_record":
            return raw
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if fmt == "chat":
        if "messages" not in obj:
            raise DataError(f"{where}: a chat record needs a 'messages' list")
        return check_messages(obj["messages"], where)
    if text_key not in obj:
        raise DataError(f"{where}: no {text_key!r} field (set data.text_key to the field holding the text)")
    return _check_text(obj[text_key], where, text_key)


class ArrayRecordDocuments:
    """Random access to the documents of ArrayRecord files, parsed on read (grain-compatible source)."""

    def __init__(self, paths: Sequence[str], fmt: str, text_key: str):
        self.paths, self.fmt, self.text_key = list(paths), fmt, text_key
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        if len(self._source) == 0:
            raise DataError(f"data file(s) {self.paths} hold no records")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str | list[dict[str, str]]:
        raw = self._source[int(index)]
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        return _parse_record(text, self.fmt, self.text_key, f"{self.paths} record {index}")

    def __repr__(self) -> str:  # grain logs sources by repr
        return f"ArrayRecordDocuments({self.paths})"


def read_documents(path: str | None, fmt: str, text_key: str = "text", doc_separator: str | None = None
                   ) -> Sequence[Any]:
    """Every document of a data path: strings, or message lists for chat. Bad input raises DataError.

    Text and JSONL files are read (and validated) eagerly; ArrayRecord files stay on disk.
    """
    if path is None:
        if fmt != "text":
            raise DataError(f"data.format={fmt!r} needs data.path (only plain text has a built-in corpus)")
        return default_corpus()
    files = resolve_paths(path)
    if fmt == "array_record" or (fmt == "chat" and all(_is_array_record(f) for f in files)):
        return ArrayRecordDocuments(files, fmt, text_key)
    docs: list[Any] = []
    for file in files:
        if _is_array_record(file):
            raise DataError(f"{file} is an ArrayRecord file: set data.format=array_record (or keep all chat "
                            "files in one format)")
        with open(file, encoding="utf-8") as f:
            try:
                content = f.read()
            except UnicodeDecodeError as e:
                raise DataError(f"{file} is not UTF-8 text ({e})") from None
        if not content.strip():
            raise DataError(f"data file {file} is empty")
        if fmt == "text":
            parts = content.split(doc_separator) if doc_separator else [content]
            docs.extend(p for p in parts if p.strip())
            continue
        for lineno, line in enumerate(content.splitlines(), 1):
            if line.strip():
                docs.append(_parse_record(line, fmt, text_key, f"{file}:{lineno}"))
    return docs


def split_train_val(docs: Sequence[Any], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, validation) documents: a seeded pick holding out about `val_fraction` of the
    characters (of the documents, for on-disk sources)."""
    n = len(docs)
    order = np.random.default_rng(seed).permutation(n)
    if val_fraction <= 0 or n < 2:
        return np.sort(order), np.zeros(0, np.int64)
    if isinstance(docs, list):
        sizes = np.array([len(d) if isinstance(d, str) else sum(len(m["content"]) for m in d) for d in docs],
                         np.float64)
    else:
        sizes = np.ones(n)
    target = val_fraction * sizes.sum()
    val, held = [], 0.0
    for i in order:  # first fit: documents that keep the held-out share under the target
        if len(val) >= n - 1:
            break
        if held + sizes[i] <= target or not val:
            val.append(i)
            held += sizes[i]
    val_set = set(val)
    train = np.array([i for i in range(n) if i not in val_set], np.int64)
    return train, np.sort(np.array(val, np.int64))


# ----------------------------------------------------------------------------- tokenization
def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
    """A SentencePiece BPE model with byte fallback, as Phi-3's own, trained on `texts`, with the Phi-3
    chat tokens as user-defined pieces (unk 0, bos 1, eos 2, then the chat tokens and the 256 bytes).

    BPE, no normalisation, whitespace kept and a dummy-prefix space: what llama.cpp reproduces from a
    GGUF file, so an exported model tokenises there as here. On a small corpus the vocabulary may
    come out smaller than `vocab_size` (a warning says so); the model's vocab follows it. Raises
    ValueError when `vocab_size` cannot hold the fixed pieces (specials, bytes, the text's characters).
    """
    import re
    import sys

    import sentencepiece as spm

    def lines() -> Iterator[str]:
        # Paragraphs, not lines, so newlines become pieces rather than <0x0A> bytes; SentencePiece
        # skips sentences over 4192 bytes, hence the 2000-character slices.
        for text in texts:
            for paragraph in text.split("\n\n"):
                for start in range(0, len(paragraph), 2000):
                    if paragraph[start: start + 2000].strip():
                        yield paragraph[start: start + 2000]

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    prefix = out_path[: -len(".model")] if out_path.endswith(".model") else out_path
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=0.9995, user_defined_symbols=list(CHAT_TOKENS), unk_id=0,
            bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            add_dummy_prefix=True, normalization_rule_name="identity")
    except RuntimeError as e:
        fixed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if fixed is None:
            raise
        raise ValueError(f"data.vocab_size={vocab_size} is too small for a tokenizer of this text: {fixed[1]} "
                         f"tokens are fixed before any merge (unk, bos, eos, {len(CHAT_TOKENS)} chat tokens, 256 "
                         f"bytes and the text's common characters); set data.vocab_size to {fixed[1]} or more"
                         ) from None
    if os.path.exists(prefix + ".vocab"):
        os.remove(prefix + ".vocab")
    if prefix + ".model" != out_path:
        os.replace(prefix + ".model", out_path)
    tokenizer = Tokenizer(out_path)
    if tokenizer.sp.get_piece_size() < vocab_size:
        print(f"warning: the tokenizer has {tokenizer.sp.get_piece_size()} tokens, not the {vocab_size} asked "
              "(data.vocab_size): the training text is too small for more pieces; give more data or a smaller "
              "data.vocab_size", file=sys.stderr, flush=True)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
    """A document -> {inputs, targets, loss_mask}: next-token pairs within the document.

    Text: [BOS] text [<|endoftext|>], every target counts. Chat: the rendered conversation; only
    the assistant replies and their closing `<|end|>` count.
    """

    tokenizer: Tokenizer
    add_bos: bool = True
    add_eos: bool = True

    def map(self, doc: Any) -> dict[str, np.ndarray]:
        if isinstance(doc, str):
            ids = self.tokenizer.encode(doc, add_bos=self.add_bos)
            if self.add_eos:
                ids.append(self.tokenizer.eos_id)
            mask = np.ones(len(ids), np.float32)
        else:
            ids, assistant = self.tokenizer.encode_chat(doc)
            mask = np.asarray(assistant, np.float32)
        ids = np.asarray(ids, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def _nonempty(example: dict[str, np.ndarray]) -> bool:
    return len(example["inputs"]) > 0


# ----------------------------------------------------------------------------- packing
class _PackIterator(grain.DatasetIterator):
    """Greedy sequential packing; its state is (parent state before the current document, offset in it)."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, split_documents: bool):
        super().__init__(parent)
        self._seq_len, self._split = seq_len, split_documents
        self._doc: dict[str, np.ndarray] | None = None
        self._offset = 0
        self._doc_state: Any = None

    def _fetch(self) -> bool:
        state = self._parent.get_state()
        try:
            doc = next(self._parent)
        except StopIteration:
            return False
        self._doc, self._offset, self._doc_state = doc, 0, state
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        t = self._seq_len
        row = {k: np.zeros(t, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        pos, segment = 0, 0
        while pos < t:
            if self._doc is None and not self._fetch():
                break
            doc, start = self._doc, self._offset
            left, space = len(doc["inputs"]) - start, t - pos
            if left > space and pos > 0 and start == 0 and not self._split:
                break  # keep the document whole: it starts the next row
            n = min(left, space)
            segment += 1
            for key in ("inputs", "targets", "loss_mask"):
                row[key][pos: pos + n] = doc[key][start: start + n]
            row["segment_ids"][pos: pos + n] = segment
            row["positions"][pos: pos + n] = np.arange(n, dtype=np.int32)
            pos += n
            self._offset += n
            if self._offset == len(doc["inputs"]):
                self._doc = None
        if pos == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": -1}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["offset"] >= 0:
            if not self._fetch():
                raise DataError("the checkpointed data position is past the end of the data")
            self._offset = state["offset"]


class PackIterDataset(grain.IterDataset):
    """Rows of `seq_len` tokens from {inputs, targets, loss_mask} documents, with segment ids and positions.

    Documents are laid one after another; one that does not fit in the rest of a row continues in the
    next row (as a new segment) when `split_documents`, else starts the next row (padding this one).
    Documents longer than a row are always cut into row-sized pieces.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, split_documents: bool = True):
        super().__init__(parent)
        self._seq_len, self._split = seq_len, split_documents

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._split)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, split_documents={self._split})"


# ----------------------------------------------------------------------------- pipelines
def _documents(docs: Sequence[Any], indices: np.ndarray) -> grain.MapDataset:
    return grain.MapDataset.source(np.asarray(indices, np.int64)).map(lambda i: docs[int(i)])


def _read_options() -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)


class _RowStreamsIterator:
    """Stacks one row from each stream; its state is {"rows": {row: that stream's state}}."""

    def __init__(self, streams: dict[int, Any]):
        self._streams = streams

    def __iter__(self) -> _RowStreamsIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(stream) for stream in self._streams.values()]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"rows": {str(r): stream.get_state() for r, stream in self._streams.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("rows", {})
        missing = [r for r in self._streams if str(r) not in saved]
        if missing:
            raise DataError(f"the checkpointed data position holds rows {sorted(map(int, saved))} but this run "
                            f"reads rows {missing} too: was the global batch size changed? Resume with the "
                            "batch_size the run was saved with")
        for r, stream in self._streams.items():
            stream.set_state(saved[str(r)])


class RowStreams:
    """The global batch as `batch_size` independent row streams, of which this process builds `rows`.

    make_stream(r) is row r's endless stream of packed rows (a grain IterDataset). Iterating
    yields {key: [len(rows), seq_len]} batches.
    """

    def __init__(self, make_stream: Callable[[int], grain.IterDataset], batch_size: int,
                 rows: Sequence[int] | None = None):
        self.batch_size = batch_size
        self.rows = list(range(batch_size)) if rows is None else [int(r) for r in rows]
        self._make_stream = make_stream

    def __iter__(self) -> _RowStreamsIterator:
        return _RowStreamsIterator({r: iter(self._make_stream(r)) for r in self.rows})


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The global data position: the row states of every process's iterator in one object."""
    rows: dict[str, Any] = {}
    for state in states:
        rows.update(state["rows"])
    return {"rows": dict(sorted(rows.items(), key=lambda kv: int(kv[0])))}


def stream_order(indices: np.ndarray, seed: int, shuffle: bool, row: int, batch_size: int) -> grain.MapDataset:
    """Row `row`'s share of the endless, per-epoch shuffled order of `indices`."""
    ds = grain.MapDataset.source(np.asarray(indices, np.int64))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(None)[row::batch_size]


def train_batches(docs: Sequence[Any], indices: np.ndarray, tokenizer: Tokenizer, *, seq_len: int,
                  batch_size: int, seed: int, rows: Sequence[int] | None = None, shuffle: bool = True,
                  split_documents: bool = True, add_bos: bool = True, add_eos: bool = True) -> RowStreams:
    """The endless training stream: batches {key: [len(rows), seq_len]} of the global batch's `rows`
    (default all `batch_size`), the same whichever process builds them (see the module docstring)."""
    if len(indices) == 0:
        raise DataError("the training split holds no documents")
    tokenize = Tokenize(tokenizer, add_bos, add_eos)

    def stream(row: int) -> grain.IterDataset:
        ds = stream_order(indices, seed, shuffle, row, batch_size).map(lambda i: docs[int(i)]).map(tokenize)
        return PackIterDataset(ds.to_iter_dataset(_read_options()).filter(_nonempty), seq_len, split_documents)

    return RowStreams(stream, batch_size, rows)


def eval_batches(docs: Sequence[Any], indices: np.ndarray, tokenizer: Tokenizer, *, seq_len: int,
                 batch_size: int, rows: Sequence[int] | None = None, split_documents: bool = True,
                 add_bos: bool = True, add_eos: bool = True, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """The validation split packed once, padded to whole global batches, the `rows` of each (default all).

    Every process packs all of it (validation sets are small) so all run the same number of batches.
    """
    if len(indices) == 0:
        return []
    ds = _documents(docs, indices).map(Tokenize(tokenizer, add_bos, add_eos)).to_iter_dataset(_read_options())
    packed = list(PackIterDataset(ds.filter(_nonempty), seq_len, split_documents))
    pad = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
    return rows_to_batches(packed, pad, batch_size, rows, max_batches)


def rows_to_batches(packed: list[dict[str, np.ndarray]], pad: dict[str, np.ndarray], batch_size: int,
                    rows: Sequence[int] | None = None, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """Packed rows in global batches of `batch_size` (the last padded with `pad`, at most `max_batches`
    if set), each reduced to the global `rows` this process holds (default all)."""
    n_batches = -(-len(packed) // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    packed = (packed + [pad] * (n_batches * batch_size - len(packed)))[: n_batches * batch_size]
    rows = range(batch_size) if rows is None else rows
    return [{k: np.stack([packed[b * batch_size + int(r)][k] for r in rows]) for k in pad} for b in range(n_batches)]


def document_pairs(docs: Sequence[Any], indices: np.ndarray, tokenizer: Tokenizer, add_bos: bool = True,
                   add_eos: bool = True, max_tokens: int = 20_000_000) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of every counted next-token pair of some documents (up to max_tokens)."""
    tok = Tokenize(tokenizer, add_bos, add_eos)
    xs, ys, total = [], [], 0
    for i in indices:
        ex = tok.map(docs[int(i)])
        keep = ex["loss_mask"] > 0
        xs.append(ex["inputs"][keep])
        ys.append(ex["targets"][keep])
        total += int(keep.sum())
        if total >= max_tokens:
            break
    if not xs:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(xs), np.concatenate(ys)
