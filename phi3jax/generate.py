"""Autoregressive generation: KV cache, one prefill, then a jitted decode loop.

Prompts of different lengths are right-padded into one [B, S] token buffer; each row keeps
its own length, writes its keys/values at its own cache offset, and attends to exactly its
own tokens. Positions are therefore 0..len-1 per row, as HF's generate computes them from
the attention mask.

Decoding runs in chunks of up to `chunk_size` steps inside one `lax.while_loop` (no Python
per token); between chunks an optional callback sees the new tokens, which is how a CLI
streams text. Shapes are bucketed, so a chat session compiles a bounded set of programs.

LongRoPE: the short/long factor switch follows HF exactly. HF picks the factors from the
longest sequence in the batch; when that first exceeds `original_max_position_embeddings`
during decoding it drops its cache and re-runs the whole sequence with the long factors.
We do the same: the decode loop stops at that step, `_reprefill` recomputes the cache over
the whole buffer with long factors, and decoding carries on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.model import (
    KVCache,
    Params,
    Phi3,
    check_tokens,
    inference_layout,
    is_inference_layout,
    kv_cache_heads_major,
)
from phi3jax.rope import use_long_factors


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class DecodeState(NamedTuple):
    tokens: jax.Array  # [B, S] prompt then generated tokens, right-padded
    lengths: jax.Array  # [B] tokens in `tokens` per row; the last one is not yet in the cache
    cache: KVCache  # keys/values of tokens [0, lengths - 1)
    done: jax.Array  # [B] the row produced a stop token
    num_generated: jax.Array  # [B] tokens generated, the stop token included
    step: jax.Array  # [] decode steps taken (every row advances every step)
    cache_long: jax.Array  # [] the cache was computed with LongRoPE's long factors
    rng: jax.Array


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] generated ids, padded after a row stops
    lengths: np.ndarray  # [B] generated tokens per row (a final stop token included)

    def to_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def greedy_tokens(logits_bv: jax.Array) -> jax.Array:
    """jnp.argmax over the vocabulary (first maximum; first NaN if any), as two plain reductions.

    XLA on CPU compiles argmax to a variadic (value, index) reduction that runs ~7x slower than
    a max followed by a min over the matching indices (142 us against 22 us for one row of 32064
    logits; ~1.5% of a decode step of the benchmark model).
    """
    top = jnp.max(logits_bv, axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, logits_bv.ndim - 1)
    hits = (logits_bv == top) | jnp.isnan(logits_bv)
    return jnp.min(jnp.where(hits, ids, logits_bv.shape[-1]), axis=-1)


def sample_logits(logits_bv: jax.Array, rng: jax.Array, sampling: SamplingParams) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if sampling.temperature == 0.0:
        return greedy_tokens(logits_bv)
    logits = logits_bv / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(cfg: Phi3Config, batch: int, max_len: int) -> KVCache:
    """An empty cache in `cfg`'s layout (see `KVCache`)."""
    kv, hd, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    if kv_cache_heads_major(cfg):
        k_shape, v_shape = (layers, batch, kv, max_len, hd), (layers, batch, kv, hd, max_len)
    else:
        k_shape = v_shape = (layers, batch, max_len, kv, hd)
    return KVCache(jnp.zeros(k_shape, cfg.dtype), jnp.zeros(v_shape, cfg.dtype))


def inference_params(params: Params, cfg: Phi3Config, donate: bool = False) -> Params:
    """The parameters `generate` runs fastest from on this backend; make them once, at load time.

    On CPU that is the per-layer inference layout (`phi3jax.model.inference_layout`): decoding
    is bandwidth-bound and XLA on CPU would otherwise copy weights on every step. `generate`
    given the stacked (training) tree makes this layout itself on every call, which costs a copy
    of the weights per call (per chat turn). Elsewhere (TPU, GPU) the stacked tree is returned as
    is. donate=True frees the stacked arrays as they are split (the caller's `params` must not be
    used afterwards), so converting costs one weight group's share of memory (gate and up, the
    largest) instead of a second copy of the weights.
    """
    if jax.default_backend() == "cpu":
        return inference_layout(params, cfg, donate=donate)
    return params


def _accept(state: DecodeState, logits_bv: jax.Array, cache: KVCache, sampling: SamplingParams,
            stop_ids: jax.Array, pad_id: int, max_new: jax.Array) -> DecodeState:
    """Sample each row's next token, append it, update stop flags."""
    rng, key = jax.random.split(state.rng)
    nxt = sample_logits(logits_bv, key, sampling)
    nxt = jnp.where(state.done, pad_id, nxt)  # finished rows emit padding, as HF does
    batch_idx = jnp.arange(nxt.shape[0])
    tokens = state.tokens.at[batch_idx, state.lengths].set(nxt)
    num_generated = state.num_generated + (~state.done).astype(jnp.int32)
    done = state.done | jnp.isin(nxt, stop_ids) | (num_generated >= max_new)
    return state._replace(tokens=tokens, lengths=state.lengths + 1, cache=cache, done=done,
                          num_generated=num_generated, rng=rng)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "prompt_width", "pad_id", "unrolled"))
def _prefill(params: Params, cfg: Phi3Config, tokens_bs: jax.Array, prompt_lengths_b: jax.Array,
             rng: jax.Array, stop_ids: jax.Array, max_new: jax.Array, *, sampling: SamplingParams,
             prompt_width: int, pad_id: int, unrolled: bool) -> DecodeState:
    batch, max_len = tokens_bs.shape
    prompt = tokens_bs[:, :prompt_width]
    positions = jnp.broadcast_to(jnp.arange(prompt_width, dtype=jnp.int32), prompt.shape)
    long = jnp.asarray(use_long_factors(cfg, jnp.max(prompt_lengths_b)))
    logits, cache = Phi3(cfg, unrolled=unrolled).apply(
        {"params": params}, prompt, positions, long_rope=long, cache=init_cache(cfg, batch, max_len),
        q_offset_b=jnp.zeros((batch,), jnp.int32), logits_index_b=prompt_lengths_b - 1)
    state = DecodeState(tokens=tokens_bs, lengths=prompt_lengths_b, cache=cache,
                        done=jnp.zeros((batch,), bool), num_generated=jnp.zeros((batch,), jnp.int32),
                        step=jnp.zeros((), jnp.int32), cache_long=long, rng=rng)
    return _accept(state, logits[:, 0], cache, sampling, stop_ids, pad_id, max_new)


def _needs_long_switch(cfg: Phi3Config, state: DecodeState) -> jax.Array:
    """The next step's sequence crosses original_max_position_embeddings on a short-factor cache."""
    return jnp.asarray(use_long_factors(cfg, jnp.max(state.lengths))) & ~state.cache_long


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "pad_id", "unrolled"), donate_argnames=("state",))
def _decode_chunk(params: Params, cfg: Phi3Config, state: DecodeState, stop_ids: jax.Array,
                  max_new: jax.Array, end_step: jax.Array, *, sampling: SamplingParams,
                  pad_id: int, unrolled: bool) -> DecodeState:
    model = Phi3(cfg, unrolled=unrolled)

    def cond(carry: tuple[Params, DecodeState]) -> jax.Array:
        s = carry[1]
        return (s.step < end_step) & ~jnp.all(s.done) & ~_needs_long_switch(cfg, s)

    # The parameters ride in the loop carry rather than being closed over: newer flax/jax
    # versions reject a lifted nn.scan whose variables are constants captured from outside.
    def body(carry: tuple[Params, DecodeState]) -> tuple[Params, DecodeState]:
        p, s = carry
        last = s.lengths - 1
        token_b1 = jnp.take_along_axis(s.tokens, last[:, None], axis=1)
        logits, cache = model.apply({"params": p}, token_b1, last[:, None], long_rope=s.cache_long,
                                    cache=s.cache, q_offset_b=last)
        s = _accept(s, logits[:, 0], cache, sampling, stop_ids, pad_id, max_new)
        return p, s._replace(step=s.step + 1)

    return jax.lax.while_loop(cond, body, (params, state))[1]


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "pad_id", "unrolled"), donate_argnames=("state",))
def _reprefill(params: Params, cfg: Phi3Config, state: DecodeState, stop_ids: jax.Array,
               max_new: jax.Array, *, sampling: SamplingParams, pad_id: int, unrolled: bool) -> DecodeState:
    """One decode step that recomputes the whole cache with LongRoPE's long factors (as HF does)."""
    batch, max_len = state.tokens.shape
    positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), state.tokens.shape)
    logits, cache = Phi3(cfg, unrolled=unrolled).apply(
        {"params": params}, state.tokens, positions, long_rope=True, cache=init_cache(cfg, batch, max_len),
        q_offset_b=jnp.zeros((batch,), jnp.int32), logits_index_b=state.lengths - 1)
    state = state._replace(cache_long=jnp.asarray(True))
    state = _accept(state, logits[:, 0], cache, sampling, stop_ids, pad_id, max_new)
    return state._replace(step=state.step + 1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _as_prompt_list(prompt_tokens: Any) -> list[np.ndarray]:
    if isinstance(prompt_tokens, np.ndarray | jax.Array):
        arr = np.asarray(prompt_tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompt_tokens must be [batch, length], got shape {arr.shape}")
        return list(arr)
    if not isinstance(prompt_tokens, Sequence) or not prompt_tokens:
        raise ValueError("prompt_tokens must be a non-empty list of token-id lists or a 2-D array")
    if all(isinstance(t, int | np.integer) for t in prompt_tokens):
        return [np.asarray(prompt_tokens)]
    return [np.asarray(p) for p in prompt_tokens]


def generate(params: Params, cfg: Phi3Config, prompt_tokens: Any, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, callback: Callable[[list[list[int]]], Any] | None = None,
             chunk_size: int = 32, bucket: int = 64) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens for each prompt.

    params: the stacked tree `load_hf` / `init_params` give, or, for repeated calls on CPU, the
    tree `inference_params` made once from it (otherwise each call converts it again).
    prompt_tokens: a list of token-id lists (any lengths) or an int [B, T] array.
    stop_tokens: ids that end a row (default: the config's eos ids); the stop token is
    included in the output. callback: called after each chunk of decode steps with the new
    tokens of every row (a list per row), for streaming. Prompt and cache sizes are rounded
    up to multiples of `bucket` so repeated calls reuse compiled programs.
    """
    prompts = _as_prompt_list(prompt_tokens)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
    for p in prompts:
        check_tokens(p[None], cfg.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = int(lengths.max()) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    sampling = SamplingParams(float(temperature), int(top_k), float(top_p))
    stops = tuple(cfg.eos_token_id if stop_tokens is None else stop_tokens)
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0)

    prompt_width = _round_up(int(lengths.max()), bucket)
    max_len = prompt_width + _round_up(max_new_tokens, bucket)
    buffer = np.full((len(prompts), max_len), pad_id, np.int32)
    for row, p in enumerate(prompts):
        buffer[row, : len(p)] = p
    max_new = jnp.asarray(max_new_tokens, jnp.int32)
    params = inference_params(params, cfg)  # free when the caller already holds them (see there)
    unrolled = is_inference_layout(params)
    static = dict(sampling=sampling, pad_id=pad_id, unrolled=unrolled)

    state = _prefill(params, cfg, jnp.asarray(buffer), jnp.asarray(lengths), jax.random.key(seed), stop_ids,
                     max_new, prompt_width=prompt_width, **static)
    emitted = np.zeros(len(prompts), np.int64)

    def emit(state: DecodeState) -> None:
        if callback is None:
            return
        tokens, generated = np.asarray(state.tokens), np.asarray(state.num_generated)
        chunks = [tokens[b, lengths[b] + emitted[b]: lengths[b] + generated[b]].tolist()
                  for b in range(len(prompts))]
        emitted[:] = generated
        callback(chunks)

    emit(state)
    while not bool(jnp.all(state.done)):
        if bool(_needs_long_switch(cfg, state)):
            state = _reprefill(params, cfg, state, stop_ids, max_new, **static)
        else:
            end = jnp.minimum(state.step + chunk_size, max_new_tokens)
            state = _decode_chunk(params, cfg, state, stop_ids, max_new, end, **static)
        emit(state)

    tokens, generated = np.asarray(state.tokens), np.asarray(state.num_generated)
    out = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
    for b in range(len(prompts)):
        out[b, : generated[b]] = tokens[b, lengths[b]: lengths[b] + generated[b]]
    return GenerateOutput(out, generated.astype(np.int32))
