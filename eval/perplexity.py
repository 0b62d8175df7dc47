"""Perplexity of a model on a text file or JSONL, with sliding windows for long documents.

BOS convention: every document is encoded on its own and prefixed with the BOS token (id 1 for
Phi-3). The BOS is context only, never a target; every token of the document is a target
exactly once. So `tokens` is the number of document tokens and the first token is scored as
p(token | BOS), as Phi-3 sees text in training and in its chat template.

Windows (for documents longer than the context): with window length T (`seq_len`) and stride
S <= T, the first window scores the first T targets; every later window scores the next S
targets, the first of them with T - S + 1 tokens of context (the window slides by S). S = T
(the default) gives disjoint windows, each starting with one token of context: lm-evaluation-
harness's rolling log-likelihood. A smaller S gives every token more context (lower
perplexity, about T / S times the compute), as in Hugging Face's perplexity guide, except
that here no token is dropped at a window edge. Windows after the first carry no BOS.

Reported: documents, tokens (targets), mean NLL in nats per token, perplexity = exp(mean NLL),
and bits per UTF-8 byte of the scored text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from phi3jax.config import Phi3Config
from phi3jax.eval.loglikelihood import Row, score_rows
from phi3jax.model import Params

BOS_CONVENTION = ("each document is encoded on its own and prefixed with BOS; BOS is never a target, "
                  "every document token is scored exactly once")


class EvalDataError(ValueError):
    """An evaluation data file that cannot be read as the format asks."""


def read_documents(path: str | os.PathLike, text_key: str = "text") -> list[str]:
    """Documents from a file: JSONL (.jsonl / .json lines) gives one document per line, from the
    `text_key` field of an object or a bare JSON string; any other file is one document."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data file at {path!r}")
    if os.path.isdir(path):
        raise EvalDataError(f"{path} is a directory; pass a .txt or .jsonl file")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if not raw.strip():
        raise EvalDataError(f"{path} is empty: no text to evaluate")
    if not path.endswith((".jsonl", ".json", ".jsonl.txt")):
        return [raw]
    docs = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict):
            if text_key not in record:
                raise EvalDataError(f"{path} line {lineno}: no {text_key!r} field (fields: {sorted(record)}); "
                                    "choose the field with --text-key")
            text = record[text_key]
            if not isinstance(text, str):
                raise EvalDataError(f"{path} line {lineno}: field {text_key!r} is a "
                                    f"{type(text).__name__}, not a string")
        else:
            raise EvalDataError(f"{path} line {lineno}: expected a JSON object or string, got "
                                f"{type(record).__name__}")
        if text.strip():
            docs.append(text)
    if not docs:
        raise EvalDataError(f"{path} has no non-empty documents")
    return docs


def windows(ids: Sequence[int], seq_len: int, stride: int) -> list[Row]:
    """Rows that score tokens 1.. of `ids` (ids[0] is the BOS) exactly once; see the module doc."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    rows = []
    begin, end = 1, min(1 + seq_len, len(ids))  # targets ids[begin:end]
    while begin < end:
        start = max(0, end - 1 - seq_len)  # the input is ids[start:end - 1]
        rows.append(Row(list(ids[start: end - 1]), [t - 1 - start for t in range(begin, end)],
                        [int(ids[t]) for t in range(begin, end)]))
        begin, end = end, min(end + stride, len(ids))
    return rows


@dataclasses.dataclass
class PerplexityResult:
    documents: int
    tokens: int
    nll_sum: float
    bytes: int
    windows: int
    seq_len: int
    stride: int
    bos_id: int | None

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "mean_nll": self.mean_nll,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "bytes": self.bytes,
                "windows": self.windows, "seq_len": self.seq_len, "stride": self.stride,
                "bos": {"id": self.bos_id, "convention": BOS_CONVENTION if self.bos_id is not None
                        else "no BOS: the first token of each document is context only, never a target"}}


def perplexity(params: Params, cfg: Phi3Config, documents: Sequence[Sequence[int]], seq_len: int | None = None,
               stride: int | None = None, batch_size: int | None = None, bos_id: int | None = 1,
               num_bytes: int = 0, progress: bool | str = True) -> PerplexityResult:
    """Perplexity over token-id documents (without BOS; it is added here when bos_id is not None).

    seq_len defaults to min(original_max_position_embeddings, 2048); stride to seq_len; batch_size to
    as many windows as fit 8192 tokens (the float32 logits of a batch are batch * seq_len * vocab * 4 bytes).
    """
    seq_len = seq_len or min(cfg.original_max_position_embeddings, 2048)
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len must be in [1, max_position_embeddings={cfg.max_position_embeddings}], "
                         f"got {seq_len}")
    stride = stride or seq_len
    batch_size = batch_size or max(1, 8192 // seq_len)
    rows: list[Row] = []
    docs = 0
    for doc in documents:
        ids = ([bos_id] if bos_id is not None else []) + [int(t) for t in doc]
        if len(ids) < 2:
            continue  # nothing to predict
        docs += 1
        rows.extend(windows(ids, seq_len, stride))
    if not rows:
        raise EvalDataError("no tokens to score: every document is empty"
                            + ("" if bos_id is not None else " or a single token"))
    scored = score_rows(params, cfg, rows, batch_size=batch_size, progress=progress)
    nll = -math.fsum(float(v) for logp, _ in scored for v in logp)
    tokens = sum(len(r.query_tok) for r in rows)
    return PerplexityResult(docs, tokens, nll, num_bytes, len(rows), seq_len, stride, bos_id)


def perplexity_of_texts(params: Params, cfg: Phi3Config, tokenizer: Any, texts: Sequence[str], add_bos: bool = True,
                        **kwargs: Any) -> PerplexityResult:
    """Tokenise `texts` (one document each) and score them; kwargs go to `perplexity`."""
    docs = [tokenizer.encode(t) for t in texts]
    num_bytes = sum(len(t.encode("utf-8")) for t, d in zip(texts, docs, strict=True) if d)
    return perplexity(params, cfg, docs, bos_id=tokenizer.bos_id if add_bos else None, num_bytes=num_bytes,
                      **kwargs)
