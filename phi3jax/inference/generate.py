"""Autoregressive generation: KV cache, one prefill, then a jitted decode loop.

Prompts of different lengths are right-padded into one [B, S] token buffer; each row keeps
its own length, writes its keys/values at its own cache offset, and attends to exactly its
own tokens. Positions are therefore 0..len-1 per row, as HF's generate computes them from
the attention mask. The prefill attends over the prompt itself and fills the cache
(`phi3jax.ops.KVCache`); each decode step attends one new token per row against it.

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
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.inference.sampling import SamplingParams, sample_logits
from phi3jax.model import Params, Phi3, check_tokens, layers_stacked, unstack_layers
from phi3jax.ops.kv_cache import KVCache
from phi3jax.rope import use_long_factors


class DecodeState(NamedTuple):
    tokens: jax.Array  # [B, S] prompt then generated tokens, right-padded
    lengths: jax.Array  # [B] tokens in `tokens` per row; the last one is not yet in the cache
    cache: KVCache  # keys/values of tokens [0, lengths - 1)
    done: jax.Array  # [B] the row produced a stop token
    num_generated: jax.Array  # [B] tokens generated, the stop token included
    step: jax.Array  # [] decode steps taken (every row advances every step)
    cache_long: jax.Array  # [] the cache was computed with LongRoPE's long factors
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """The new tokens of each prompt (the prompt itself is not repeated).

    `out[i]` is row i's new ids as a list, without padding (a final stop token included), ready for
    `tokenizer.decode(out[i], skip_special=True)`; iterating gives every row, `len(out)` their count,
    and `to_lists()` all of them at once. `tokens` and `lengths` are the arrays underneath.
    """

    tokens: np.ndarray  # [B, max_new_tokens] generated ids, padded after a row stops
    lengths: np.ndarray  # [B] generated tokens per row (a final stop token included)

    def to_lists(self) -> list[list[int]]:
        """Each row's new ids, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, row: int) -> list[int]:
        if not isinstance(row, int | np.integer):
            raise TypeError(f"GenerateOutput[{row!r}]: index one row with an int (out[0] is the first prompt's new "
                            "ids); the padded [batch, max_new_tokens] array is out.tokens")
        return self.tokens[row, : int(self.lengths[row])].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.to_lists())


def init_cache(cfg: Phi3Config, batch: int, max_len: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens."""
    return KVCache.empty(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                         jnp.dtype(cfg.dtype))


def inference_params(params: Params, donate: bool = False) -> Params:
    """The parameters `generate` runs fastest from; make them once, at load time.

    The layers as per-layer subtrees (`phi3jax.model.unstack_layers`): each decode step reads every
    weight where it lies instead of slicing it out of the stacked array (which XLA on CPU copies
    before every matmul, doubling the memory traffic of bandwidth-bound decoding). The price is a
    longer compile (the layers are unrolled). donate=True frees the stacked arrays as they are
    split, so converting costs one weight's share of memory instead of a second copy of the weights
    (the caller's `params` must not be used afterwards).
    """
    return unstack_layers(params, donate=donate)


def stop_tokens(cfg: Phi3Config, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's (`<|end|>`, `<|endoftext|>`) and the config's eos ids."""
    return tuple(dict.fromkeys([*tokenizer.stop_ids, *cfg.eos_token_id]))


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


def _model(cfg: Phi3Config, params: Params, mesh: Any) -> Phi3:
    return Phi3(cfg, mesh, scan_layers=layers_stacked(params))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "prompt_width", "pad_id", "mesh"))
def _prefill(params: Params, cfg: Phi3Config, tokens_bs: jax.Array, prompt_lengths_b: jax.Array,
             rng: jax.Array, stop_ids: jax.Array, max_new: jax.Array, *, sampling: SamplingParams,
             prompt_width: int, pad_id: int, mesh: Any) -> DecodeState:
    batch, max_len = tokens_bs.shape
    prompt = tokens_bs[:, :prompt_width]
    positions = jnp.broadcast_to(jnp.arange(prompt_width, dtype=jnp.int32), prompt.shape)
    long = jnp.asarray(use_long_factors(cfg, jnp.max(prompt_lengths_b)))
    logits, cache = _model(cfg, params, mesh).apply(
        {"params": params}, prompt, positions, long_rope=long, cache=init_cache(cfg, batch, max_len),
        logits_index_b=prompt_lengths_b - 1)
    state = DecodeState(tokens=tokens_bs, lengths=prompt_lengths_b, cache=cache,
                        done=jnp.zeros((batch,), bool), num_generated=jnp.zeros((batch,), jnp.int32),
                        step=jnp.zeros((), jnp.int32), cache_long=long, rng=rng)
    return _accept(state, logits[:, 0], cache, sampling, stop_ids, pad_id, max_new)


def _needs_long_switch(cfg: Phi3Config, state: DecodeState) -> jax.Array:
    """The next step's sequence crosses original_max_position_embeddings on a short-factor cache."""
    return jnp.asarray(use_long_factors(cfg, jnp.max(state.lengths))) & ~state.cache_long


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "pad_id", "mesh"), donate_argnames=("state",))
def _decode_chunk(params: Params, cfg: Phi3Config, state: DecodeState, stop_ids: jax.Array,
                  max_new: jax.Array, end_step: jax.Array, *, sampling: SamplingParams,
                  pad_id: int, mesh: Any) -> DecodeState:
    model = _model(cfg, params, mesh)

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
                                    cache=s.cache, cache_offset_b=last)
        s = _accept(s, logits[:, 0], cache, sampling, stop_ids, pad_id, max_new)
        return p, s._replace(step=s.step + 1)

    return jax.lax.while_loop(cond, body, (params, state))[1]


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "pad_id", "mesh"), donate_argnames=("state",))
def _reprefill(params: Params, cfg: Phi3Config, state: DecodeState, stop_ids: jax.Array,
               max_new: jax.Array, *, sampling: SamplingParams, pad_id: int, mesh: Any) -> DecodeState:
    """One decode step that recomputes the whole cache with LongRoPE's long factors (as HF does)."""
    batch, max_len = state.tokens.shape
    positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), state.tokens.shape)
    logits, cache = _model(cfg, params, mesh).apply(
        {"params": params}, state.tokens, positions, long_rope=True, cache=init_cache(cfg, batch, max_len),
        logits_index_b=state.lengths - 1)
    state = state._replace(cache_long=jnp.asarray(True))
    state = _accept(state, logits[:, 0], cache, sampling, stop_ids, pad_id, max_new)
    return state._replace(step=state.step + 1)


def check_fits(cfg: Phi3Config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise ValueError unless a prompt of `prompt_tokens` plus `max_new_tokens` fits the model's context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = prompt_tokens + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                         f"model's max_position_embeddings {cfg.max_position_embeddings}; shorten the prompt or ask "
                         "for fewer new tokens")


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
             chunk_size: int = 32, bucket: int = 64, mesh: Any = None) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens for each prompt.

    params: the tree `load_hf` / `init_params` give, or, for repeated calls, the per-layer tree
    `inference_params` made once from it (decodes faster).
    prompt_tokens: a list of token-id lists (any lengths) or an int [B, T] array.
    stop_tokens: ids that end a row (default: the config's eos ids); the stop token is
    included in the output. callback: called after each chunk of decode steps with the new
    tokens of every row (a list per row), for streaming. Prompt and cache sizes are rounded
    up to multiples of `bucket` so repeated calls reuse compiled programs. mesh: the Mesh the
    parameters are laid out on (None: one device).
    Returns a `GenerateOutput`: `out[i]` is prompt i's new ids, `tokenizer.decode(out[i])` their text.
    """
    prompts = _as_prompt_list(prompt_tokens)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
    for p in prompts:
        check_tokens(p[None], cfg.vocab_size)
    check_fits(cfg, int(lengths.max()), max_new_tokens)
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
    static = dict(sampling=sampling, pad_id=pad_id, mesh=mesh)

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


def compiled_programs() -> int:
    """Programs compiled so far by generation's jitted pieces (a caller can tell when a call compiled)."""
    return sum(f._cache_size() for f in (_prefill, _decode_chunk, _reprefill))
