"""Preference data for DPO: TRL's preference records -> token pairs -> packed rows.

One JSON object per line, in either of TRL's forms:

    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}                       # conversational
    {"prompt": "...", "chosen": "...", "rejected": "..."}                      # plain text

Tokenized as TRL's DPOTrainer does (trl 1.16): conversational records render the prompt with the
chat template and the generation prompt, and prompt + completion without it; plain text gets BOS
in front (`add_bos`) and `<|endoftext|>` after each completion. The completion is what follows the
longest common prefix of the two token lists, so with Phi-3's template it is the reply and its
closing `<|end|>`. Each sequence (prompt + completion) is then cut to `max_length` tokens
(`keep_start`: a pair whose prompt alone fills it is dropped, as TRL drops it; `keep_end`), after
an optional `max_prompt_length` that keeps the prompt's end.

Packing: a pair's two sequences go into one row back to back as segments 2k+1 (chosen) and 2k+2
(rejected), so one forward pass covers both, and whole pairs are packed into rows of `seq_len`
positions (a sequence of n tokens takes n - 1). Rows are the batch format of
`phi3jax.train.step`; `loss_mask` marks the completion tokens. One more key, `pair_index` (the
record each position belongs to, -1 for padding), is host-side bookkeeping: `with_reference`
turns it into `ref_logps` (a precomputed reference's log-probability of each sequence, at the
sequence's first position) and drops it before the batch goes to the device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from phi3jax.tokenizer import Tokenizer
from phi3jax.train.batch import BATCH_KEYS
from phi3jax.train.data import DataError, RowStreams, check_messages, resolve_paths, rows_to_batches, stream_order

REF_KEY, INDEX_KEY = "ref_logps", "pair_index"
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclasses.dataclass(frozen=True)
class Pair:
    """One tokenized preference record: prompt + chosen and prompt + rejected, each as (token ids,
    completion mask)."""

    index: int
    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray]

    def sequences(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        return self.chosen, self.rejected


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    """The tokenized pairs of a file and what truncation did to them."""

    pairs: list[Pair]
    records: int  # records read
    truncated: int  # pairs with a sequence cut to max_length (or a prompt cut to max_prompt_length)
    dropped: int  # records dropped: their prompt alone fills max_length (keep_start)

    def describe(self, max_length: int) -> str:
        parts = [f"{len(self.pairs)} pairs"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to dpo.max_length={max_length} tokens")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (the prompt alone fills dpo.max_length={max_length})")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- records
def _check_record(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt', 'chosen' and 'rejected', "
                        f"got {type(obj).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise DataError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'; {missing[0]!r} is "
                        "missing")
    kinds = {k: isinstance(obj[k], str) for k in ("prompt", "chosen", "rejected")}
    if all(kinds.values()):
        return obj
    if any(kinds.values()):
        raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings (plain text) or all be "
                        "message lists (conversational)")
    prompt = check_messages(obj["prompt"], f"{where}: prompt")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; it must end with the turn the "
                        "completions answer (user or system)")
    for key in ("chosen", "rejected"):
        messages = check_messages(obj[key], f"{where}: {key}")
        if messages[0]["role"] != "assistant":
            raise DataError(f"{where}: {key} must start with an assistant turn, got role {messages[0]['role']!r}")
    return obj


def read_records(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of every line of the preference JSONL file(s) at `path`, validated."""
    out = []
    for file in resolve_paths(path):
        with open(file, encoding="utf-8") as f:
            try:
                lines = f.read().splitlines()
            except UnicodeDecodeError as e:
                raise DataError(f"{file} is not UTF-8 text ({e})") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                "preference record") from None
            out.append((where, _check_record(obj, where)))
    if not out:
        raise DataError(f"preference data {path} holds no records")
    return out


# ----------------------------------------------------------------------------- tokenization
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_record(record: dict[str, Any], tokenizer: Tokenizer, add_bos: bool = True
                    ) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of one record, as TRL's DPOTrainer tokenizes it."""
    if isinstance(record["prompt"], str):
        eos = tokenizer.decode([tokenizer.eos_id])

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_bos=add_bos)

        prompt = encode(record["prompt"])
        full = [encode(record["prompt"] + c + ("" if c.endswith(eos) else eos))
                for c in (record["chosen"], record["rejected"])]
    else:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True))
        full = [tokenizer.encode(tokenizer.apply_chat_template(record["prompt"] + c, add_generation_prompt=False))
                for c in (record["chosen"], record["rejected"])]
    n = min(_common_prefix(prompt, full[0]), _common_prefix(prompt, full[1]))
    return prompt[:n], full[0][n:], full[1][n:]


def tokenize_records(records: Sequence[tuple[str, dict[str, Any]]], tokenizer: Tokenizer, *, max_length: int,
                     max_prompt_length: int | None = None, truncation_mode: str = "keep_start",
                     add_bos: bool = True) -> PreferenceData:
    """Every record as a Pair, truncated as TRL's collator truncates (see the module docstring)."""
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(f"dpo.truncation_mode={truncation_mode!r}: must be one of {TRUNCATION_MODES}")
    pairs, truncated, dropped = [], 0, 0
    for index, (where, record) in enumerate(records):
        prompt, chosen, rejected = tokenize_record(record, tokenizer, add_bos)
        if not chosen or not rejected:
            raise DataError(f"{where}: a completion tokenizes to nothing; chosen and rejected need text")
        cut = max_prompt_length is not None and len(prompt) > max_prompt_length
        if cut:
            prompt = prompt[-max_prompt_length:]
        if truncation_mode == "keep_start" and len(prompt) >= max_length:
            dropped += 1
            continue
        window = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        sides = []
        for completion in (chosen, rejected):
            ids = np.asarray(prompt + completion, np.int32)
            mask = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(completion), np.float32)])
            cut = cut or len(ids) > max_length
            sides.append((ids[window], mask[window]))
        truncated += cut
        pairs.append(Pair(index, sides[0], sides[1]))
    return PreferenceData(pairs, len(records), truncated, dropped)


# ----------------------------------------------------------------------------- packing
def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
    row[INDEX_KEY] = np.full(seq_len, -1, np.int32)
    return row


def pair_positions(pair: Pair) -> int:
    """Positions the pair takes in a row: n - 1 for each sequence of n tokens."""
    return len(pair.chosen[0]) + len(pair.rejected[0]) - 2


def _place(row: dict[str, np.ndarray], pos: int, segment: int, pair: Pair) -> int:
    for side, (ids, mask) in enumerate(pair.sequences()):
        n = len(ids) - 1
        row["inputs"][pos: pos + n] = ids[:-1]
        row["targets"][pos: pos + n] = ids[1:]
        row["loss_mask"][pos: pos + n] = mask[1:]
        row["segment_ids"][pos: pos + n] = segment + side
        row["positions"][pos: pos + n] = np.arange(n, dtype=np.int32)
        row[INDEX_KEY][pos: pos + n] = pair.index
        pos += n
    return pos


class _PairPackIterator(grain.DatasetIterator):
    """Whole pairs packed greedily into rows; its state is the parent's state before the pending pair."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pending: Pair | None = None
        self._pending_state: Any = None

    def _next_pair(self) -> Pair | None:
        if self._pending is None:
            state = self._parent.get_state()
            try:
                self._pending, self._pending_state = next(self._parent), state
            except StopIteration:
                return None
        return self._pending

    def __next__(self) -> dict[str, np.ndarray]:
        row = _empty_row(self._seq_len)
        pos, segment = 0, 1
        while (pair := self._next_pair()) is not None:
            need = pair_positions(pair)
            if need > self._seq_len:
                raise DataError(f"preference record {pair.index} takes {need} positions, more than seq_len="
                                f"{self._seq_len}; lower dpo.max_length")
            if pos + need > self._seq_len:
                break
            pos = _place(row, pos, segment, pair)
            segment += 2
            self._pending = None
        if pos == 0:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._pending is None:
            return {"parent": self._parent.get_state(), "pending": False}
        return {"parent": self._pending_state, "pending": True}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        if state["pending"] and self._next_pair() is None:
            raise DataError("the checkpointed data position is past the end of the preference data")


class PairPackIterDataset(grain.IterDataset):
    """Rows of `seq_len` positions holding whole pairs (`_PairPackIterator`)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self) -> _PairPackIterator:
        return _PairPackIterator(self._parent.__iter__(), self._seq_len)

    def __str__(self) -> str:
        return f"PairPackIterDataset(seq_len={self._seq_len})"


def train_batches(pairs: Sequence[Pair], *, seq_len: int, batch_size: int, seed: int,
                  rows: Sequence[int] | None = None, shuffle: bool = True) -> RowStreams:
    """The endless stream of batches of packed pairs, the global batch's `rows` of each (default all):
    row r packs pairs r, r + B, ... of each epoch's order (shuffled by (seed, epoch)), as
    `phi3jax.train.data.train_batches` does with documents."""
    if not pairs:
        raise DataError("the training split holds no preference pairs")
    pairs = list(pairs)

    def stream(row: int) -> grain.IterDataset:
        order = stream_order(np.arange(len(pairs)), seed, shuffle, row, batch_size).map(lambda i: pairs[int(i)])
        return PairPackIterDataset(order.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)),
                                   seq_len)

    return RowStreams(stream, batch_size, rows)


def eval_batches(pairs: Sequence[Pair], *, seq_len: int, batch_size: int, rows: Sequence[int] | None = None
                 ) -> list[dict[str, np.ndarray]]:
    """Every pair once, in order, packed and padded to whole global batches; the `rows` of each."""
    if not pairs:
        return []
    source = grain.MapDataset.source(list(pairs)).to_iter_dataset()
    packed = list(PairPackIterDataset(source, seq_len))
    return rows_to_batches(packed, _empty_row(seq_len), batch_size, rows)


def with_reference(batch: dict[str, np.ndarray], table: np.ndarray | None) -> dict[str, np.ndarray]:
    """The batch for the device: `pair_index` dropped and, with a precomputed reference table
    [records, 2] (chosen, rejected), `ref_logps` holding each sequence's value at its first position."""
    out = {k: v for k, v in batch.items() if k != INDEX_KEY}
    if table is not None:
        seg, index = batch["segment_ids"], batch[INDEX_KEY]
        first = (batch["positions"] == 0) & (seg > 0)
        ref = np.zeros(seg.shape, np.float32)
        ref[first] = table[index[first], (seg[first] - 1) % 2]
        out[REF_KEY] = ref
    return out


def record_logps(logps: np.ndarray, batch: dict[str, np.ndarray], n_records: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Scatter a batch's per-pair [B, T/2, 2] values back to records: out[record] = (chosen, rejected)."""
    out = np.full((n_records, 2), np.nan, np.float64) if out is None else out
    seg, index = batch["segment_ids"], batch[INDEX_KEY]
    for b in range(seg.shape[0]):
        firsts = np.flatnonzero((batch["positions"][b] == 0) & (seg[b] > 0) & ((seg[b] - 1) % 2 == 0))
        for p in firsts:
            k = (seg[b, p] - 1) // 2
            out[index[b, p]] = logps[b, k]
    return out


# ----------------------------------------------------------------------------- the reference table
REFERENCE_FILE = "reference_logps.json"


def save_reference(run_dir: str, table: dict[str, np.ndarray], fingerprint: dict[str, Any]) -> str:
    """Write the precomputed reference log-probabilities ({split: [records, 2]}) atomically."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": fingerprint, **{k: np.asarray(v, np.float64).tolist() for k, v in table.items()}},
                  f)
    os.replace(tmp, path)
    return path


def load_reference(run_dir: str, fingerprint: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The stored table if it was computed for exactly this data and reference, else None."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored.pop("fingerprint", None) != json.loads(json.dumps(fingerprint)):
        return None
    return {k: np.asarray(v, np.float32) for k, v in stored.items()}
