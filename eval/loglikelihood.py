"""Batched, jitted log-likelihood scoring: the engine under perplexity and multiple choice.

A *row* is one model input (token ids) plus *queries*: (position, token) pairs asking
"log p(token | input[: position + 1])". Rows are sorted by length, grouped into batches of a
fixed size and right-padded to a bucketed length, so a whole evaluation compiles a handful of
programs (one per length bucket and query bucket) however many rows it has.

Only per-query numbers leave the device: the log-probability of the asked token and whether it
is the argmax (lm-evaluation-harness's `is_greedy`). The full [B, T, vocab] log-softmax is
never materialised: log p = logit - logsumexp(logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from phi3jax.config import Phi3Config
from phi3jax.model import Params, logits_fn


@dataclasses.dataclass
class Row:
    """One model input and the next-token log-probabilities wanted from it."""

    tokens: list[int]
    query_pos: list[int]  # logits at this input position ...
    query_tok: list[int]  # ... scored for this token


def length_bucket(n: int, minimum: int = 16) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and their 1.5x) that holds n.

    Padding costs at most 1.5x (about 1.2x on average) while the number of distinct shapes
    stays logarithmic in the longest input.
    """
    size = minimum
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_batch(params: Params, cfg: Phi3Config, tokens_bt: jax.Array, lengths_b: jax.Array,
                 qpos_bq: jax.Array, qtok_bq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(qtok | tokens[:qpos + 1]) and whether qtok is the argmax, both [B, Q]."""
    batch, length = tokens_bt.shape
    padding_mask = jnp.arange(length)[None, :] < lengths_b[:, None]
    logits_btv = logits_fn(params, cfg, tokens_bt, padding_mask=padding_mask)
    vocab = logits_btv.shape[-1]
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    best_bt = jnp.argmax(logits_btv, axis=-1)
    flat = logits_btv.reshape(batch, length * vocab)
    picked_bq = jnp.take_along_axis(flat, qpos_bq * vocab + qtok_bq, axis=1)
    logp_bq = picked_bq - jnp.take_along_axis(lse_bt, qpos_bq, axis=1)
    greedy_bq = jnp.take_along_axis(best_bt, qpos_bq, axis=1) == qtok_bq
    return logp_bq, greedy_bq


def score_rows(params: Params, cfg: Phi3Config, rows: Sequence[Row], batch_size: int = 8,
               progress: bool | str = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(log-probabilities [Q], is-argmax [Q]) of every row's queries, in the rows' order.

    Rows are scored longest first in batches of `batch_size` (the last batch is filled with
    one-token dummy rows; fewer rows than that make a smaller batch, a power of two), each padded
    to `length_bucket` of its longest row. `progress` is a
    description for the tqdm bar, or False for none.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for k, row in enumerate(rows):
        if not row.tokens:
            raise ValueError(f"row {k} has no tokens")
        if len(row.tokens) > cfg.max_position_embeddings:
            raise ValueError(f"row {k} has {len(row.tokens)} tokens, more than the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        if len(row.query_pos) != len(row.query_tok):
            raise ValueError(f"row {k}: query_pos and query_tok differ in length")
        if row.query_pos and not 0 <= min(row.query_pos) <= max(row.query_pos) < len(row.tokens):
            raise ValueError(f"row {k}: a query position is outside the row's {len(row.tokens)} tokens")
    # Fewer rows than a batch: shrink it (to a power of two, so shapes stay few) rather than pad.
    batch_size = min(batch_size, 1 << max(len(rows) - 1, 0).bit_length())
    order = sorted(range(len(rows)), key=lambda k: (-len(rows[k].tokens), k))
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(rows)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc=progress if isinstance(progress, str) else "scoring", unit="batch",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for members in bar:
        longest = max(len(rows[k].tokens) for k in members)
        width = min(length_bucket(longest), cfg.max_position_embeddings)
        queries = length_bucket(max(max(len(rows[k].query_pos) for k in members), 1), minimum=4)
        tokens = np.zeros((batch_size, width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        qpos = np.zeros((batch_size, queries), np.int32)
        qtok = np.zeros((batch_size, queries), np.int32)
        for b, k in enumerate(members):
            row = rows[k]
            tokens[b, : len(row.tokens)] = row.tokens
            lengths[b] = len(row.tokens)
            qpos[b, : len(row.query_pos)] = row.query_pos
            qtok[b, : len(row.query_tok)] = row.query_tok
        logp, greedy = _score_batch(params, cfg, tokens, lengths, qpos, qtok)
        logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
        for b, k in enumerate(members):
            n = len(rows[k].query_pos)
            results[k] = (logp[b, :n], greedy[b, :n])
    return results  # type: ignore[return-value]


def loglikelihoods(params: Params, cfg: Phi3Config, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   max_length: int | None = None, batch_size: int = 8,
                   progress: bool | str = True) -> list[tuple[float, bool]]:
    """lm-evaluation-harness's `loglikelihood`: for each (context ids, continuation ids) the summed
    log-probability of the continuation given the context, and whether greedy decoding would
    have produced exactly the continuation.

    The model input is (context + continuation)[:-1], cut from the left to `max_length` tokens
    (default: the model's max_position_embeddings) as the harness does. Requests with the same
    input share one row: e.g. the four one-token answer letters of an MMLU question are scored
    from a single forward pass over the question.
    """
    max_length = max_length or cfg.max_position_embeddings
    rows: list[Row] = []
    row_of: dict[tuple[int, ...], int] = {}
    query_index: list[list[int]] = []  # per request: indices into its row's queries
    request_row: list[int] = []
    slots: list[dict[tuple[int, int], int]] = []
    for k, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {k} has an empty continuation")
        if not context:
            raise ValueError(f"request {k} has an empty context: prefix it with the BOS token")
        if len(continuation) > max_length:
            raise ValueError(f"request {k}: continuation of {len(continuation)} tokens exceeds max_length "
                             f"{max_length}")
        whole = [*context, *continuation]
        model_input = whole[-(max_length + 1):][:-1]
        first = len(model_input) - len(continuation)  # input position predicting continuation[0]
        key = tuple(model_input)
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append(Row(list(model_input), [], []))
            slots.append({})
        r = row_of[key]
        indices = []
        for j, tok in enumerate(continuation):
            q = (first + j, int(tok))
            if q not in slots[r]:
                slots[r][q] = len(rows[r].query_pos)
                rows[r].query_pos.append(q[0])
                rows[r].query_tok.append(q[1])
            indices.append(slots[r][q])
        request_row.append(r)
        query_index.append(indices)
    scored = score_rows(params, cfg, rows, batch_size=batch_size, progress=progress)
    out = []
    for r, indices in zip(request_row, query_index, strict=True):
        logp, greedy = scored[r]
        out.append((float(math.fsum(logp[indices])), bool(np.all(greedy[indices]))))
    return out


def split_on_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation, as lm-evaluation-harness does
    before tokenising (so "Answer: " + "A" is scored as "Answer:" + " A")."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def encode_pair(encode, context: str, continuation: str, bos: int | None) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's context/continuation tokenisation: split on the whitespace boundary,
    encode context + continuation as one string, and take the continuation's ids as whatever the
    whole string has beyond the context's own encoding. `bos`, if given, is prepended."""
    context, continuation = split_on_whitespace(context, continuation)
    prefix = [] if bos is None else [bos]
    whole = prefix + list(encode(context + continuation))
    context_ids = prefix + list(encode(context)) if context else prefix
    return context_ids, whole[len(context_ids):]
