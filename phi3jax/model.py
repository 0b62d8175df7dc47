"""The Phi-3 transformer in Flax linen, and the pure functions around it.

    x = embed(tokens)
    for each layer (one `nn.scan`, so compile time is flat in depth):
        x = x + attn(rmsnorm(x))      # q/k/v/o keep heads explicit, RoPE on q and k
        x = x + mlp(rmsnorm(x))       # down(up * silu(gate))
    logits = lm_head(rmsnorm(x))     # or x @ embed.T when embeddings are tied

Parameter tree (leading `layers` axis on everything under `layers`):
    embed [vocab, embed]
    layers/attn_norm/scale [embed]      layers/mlp_norm/scale [embed]
    layers/attn/{q,k,v} [embed, heads|kv_heads, head_dim]   layers/attn/o [heads, head_dim, embed]
    layers/mlp/{gate,up} [embed, mlp]   layers/mlp/down [mlp, embed]
    final_norm/scale [embed]            lm_head [embed, vocab]   (absent when tied)

Every parameter carries logical axis names (`param_logical_axes`) and every large activation
a logical constraint; `phi3jax.sharding` maps those names onto a mesh.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from phi3jax import rope
from phi3jax.attention import attention, resolve_impl
from phi3jax.config import Phi3Config

Params = dict[str, Any]

# Logical names of activations. Parameters use embed/heads/kv_heads/head_dim/mlp/vocab/
# layers/norm; activations get their own names so a rule can shard a weight's `embed`
# dimension (FSDP) without sharding the activations' hidden dimension.
BATCH, LENGTH = "batch", "length"
ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = (
    "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")


class KVCache(NamedTuple):
    """Keys and values of every layer: [layers, batch, max_len, kv_heads, head_dim] each, or, where
    `kv_cache_heads_major(cfg)`, k [layers, batch, kv_heads, max_len, head_dim] and v [layers, batch,
    kv_heads, head_dim, max_len]."""

    k: jax.Array
    v: jax.Array


def kv_cache_heads_major(cfg: Phi3Config) -> bool:
    """The KV cache layout: heads-major for XLA attention, keys [L, B, KV, S, D] and values
    [L, B, KV, D, S], so that both of its matmuls (q.k over D, p.v over S) read each head's cache
    in place (with [L, B, S, KV, D] XLA on CPU transposes every layer's cache on every decode step,
    ~35% of the step); [L, B, S, KV, D] for the kernels, which tile that layout."""
    return resolve_impl(cfg.attention_impl) == "xla"


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...],
           init: Any) -> jax.Array:
    cfg: Phi3Config = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, names), shape,
                        jnp.dtype(cfg.param_dtype))


def _normal(cfg: Phi3Config) -> Any:
    return nn.initializers.normal(stddev=cfg.initializer_range)


class RMSNorm(nn.Module):
    """RMSNorm as HF computes it: normalise in float32, cast back, then scale."""

    cfg: Phi3Config

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x_btd.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x_btd.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return x32.astype(x_btd.dtype) * scale.astype(x_btd.dtype)


def _project(x_btd: jax.Array, stacked: jax.Array) -> list[jax.Array]:
    """x @ w for each weight w of `stacked` [D, n, ...] (weights of one shape on a new axis 1), as one matmul.

    One large matmul runs faster than several small ones (q/k/v, gate/up: ~6% of a CPU forward),
    and the new axis is unsharded, so each weight keeps its heads/mlp sharding.
    """
    out = jnp.einsum("btd,ds...->bts...", x_btd, stacked.astype(x_btd.dtype))
    return [out[:, :, i] for i in range(stacked.shape[1])]


def _stacked(*weights: jax.Array) -> jax.Array:
    return jnp.stack(weights, axis=1)


def fused_weights(cfg: Phi3Config) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per module, the weights the model runs as one matmul, stacked on a new axis 1: (the stacked
    leaf's name in the inference layout, the weights it holds). q/k/v together when every head has
    its own k/v, else k/v (q apart)."""
    attn = ("qkv", ("q", "k", "v")) if cfg.num_attention_heads == cfg.num_key_value_heads else ("kv", ("k", "v"))
    return {"attn": attn, "mlp": ("gate_up", ("gate", "up"))}


def _stacked_param(module: nn.Module, fused: bool, name: str, parts: tuple[str, ...],
                   specs: dict[str, tuple[tuple[int, ...], tuple[str, ...]]]) -> jax.Array:
    """The weights `parts` (shape and logical names in `specs`) stacked on a new axis 1: declared as
    one leaf `name` when `fused` (the inference layout), else declared apart and stacked here."""
    if fused:
        shape, names = specs[parts[0]]
        return _param(module, name, (shape[0], len(parts), *shape[1:]), (names[0], None, *names[1:]),
                      _normal(module.cfg))
    return _stacked(*(_param(module, part, *specs[part], _normal(module.cfg)) for part in parts))


class Attention(nn.Module):
    """Self-attention. `fused=True` takes q/k/v as one stacked weight `qkv` [embed, 3, heads,
    head_dim] (q [embed, heads, head_dim] and `kv` [embed, 2, kv_heads, head_dim] with GQA); see `Phi3`."""

    cfg: Phi3Config
    fused: bool = False

    @nn.compact
    def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_bt: jax.Array | None,
                 cache: KVCache | None, layer: jax.Array, q_offset_b: jax.Array | None
                 ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dt = x_btd.dtype
        kv_spec = ((d, kv, hd), ("embed", "kv_heads", "head_dim"))
        specs = {"q": ((d, h, hd), ("embed", "heads", "head_dim")), "k": kv_spec, "v": kv_spec}
        name, parts = fused_weights(cfg)["attn"]
        w_q = None if "q" in parts else _param(self, "q", *specs["q"], _normal(cfg))
        stacked = _stacked_param(self, self.fused, name, parts, specs)
        if w_q is None:
            q, k, v = _project(x_btd, stacked)
        else:
            (q,), (k, v) = _project(x_btd, w_q[:, None]), _project(x_btd, stacked)
        w_o = _param(self, "o", (h, hd, d), ("heads", "head_dim", "embed"), _normal(cfg))
        q = nn.with_logical_constraint(rope.apply_rope(q, cos, sin), (BATCH, LENGTH, ACT_HEADS, "head_dim"))
        k = nn.with_logical_constraint(rope.apply_rope(k, cos, sin), (BATCH, LENGTH, ACT_KV_HEADS, "head_dim"))
        v = nn.with_logical_constraint(v, (BATCH, LENGTH, ACT_KV_HEADS, "head_dim"))

        if cache is None:
            out = attention(q, k, v, q_segment_ids_bt=segment_ids_bt, causal=True,
                            sliding_window=cfg.sliding_window, impl=cfg.attention_impl)
        else:
            # Write this step's keys/values at each row's own offset, then attend over the cache.
            heads_major = kv_cache_heads_major(cfg)
            cache = KVCache(_write_cache(cache.k, k, layer, q_offset_b, "bksd" if heads_major else "bskd"),
                            _write_cache(cache.v, v, layer, q_offset_b, "bkds" if heads_major else "bskd"))
            k_all = jax.lax.dynamic_index_in_dim(cache.k, layer, axis=0, keepdims=False)
            v_all = jax.lax.dynamic_index_in_dim(cache.v, layer, axis=0, keepdims=False)
            out = attention(q, k_all, v_all, q_offset_b=q_offset_b, causal=True, sliding_window=cfg.sliding_window,
                            impl=cfg.attention_impl, kv_heads_major=heads_major)
        out = checkpoint_name(out, "attn_out")
        y = jnp.einsum("bthk,hkd->btd", out, w_o.astype(dt))
        return nn.with_logical_constraint(y, (BATCH, LENGTH, ACT_EMBED)), cache


def _write_cache(cache: jax.Array, new_btkd: jax.Array, layer: jax.Array, offset_b: jax.Array,
                 layout: str) -> jax.Array:
    """Write new[b] at cache positions offset_b[b] ... of every row b of one layer (one in-place
    scatter). `layout` names the per-layer axes after [layers]: bskd, bksd or bkds (s: position)."""
    batch, length = new_btkd.shape[:2]
    rows_b1 = jnp.arange(batch)[:, None]
    cols_bt = offset_b[:, None] + jnp.arange(length)[None, :]
    # Advanced indices (rows, cols) split by slices put their [B, T] axes first, so the update keeps
    # its [B, T, KV, D] order in every layout.
    index = {"bskd": (rows_b1, cols_bt), "bksd": (rows_b1, slice(None), cols_bt),
             "bkds": (rows_b1, slice(None), slice(None), cols_bt)}[layout]
    return cache.at[(layer, *index)].set(new_btkd.astype(cache.dtype))


class MLP(nn.Module):
    """down(up * silu(gate)). `fused=True` declares gate and up as one stacked weight `gate_up` [embed, 2, mlp]."""

    cfg: Phi3Config
    fused: bool = False

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, i = cfg.hidden_size, cfg.intermediate_size
        dt = x_btd.dtype
        name, parts = fused_weights(cfg)["mlp"]
        gate_up = _stacked_param(self, self.fused, name, parts, dict.fromkeys(parts, ((d, i), ("embed", "mlp"))))
        w_down = _param(self, "down", (i, d), ("mlp", "embed"), _normal(cfg))
        gate, up = _project(x_btd, gate_up)
        hidden = nn.with_logical_constraint(up * nn.silu(gate), (BATCH, LENGTH, ACT_MLP))
        y = jnp.einsum("btf,fd->btd", hidden, w_down.astype(dt))
        return nn.with_logical_constraint(y, (BATCH, LENGTH, ACT_EMBED))


class DecoderLayer(nn.Module):
    """One pre-norm block. Called by `nn.scan`: (carry, layer index, broadcast args...)."""

    cfg: Phi3Config
    fused: bool = False

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, KVCache | None], layer: jax.Array, cos: jax.Array,
                 sin: jax.Array, segment_ids_bt: jax.Array | None, q_offset_b: jax.Array | None):
        x, cache = carry
        attn_out, cache = Attention(self.cfg, self.fused, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x), cos, sin, segment_ids_bt, cache, layer, q_offset_b)
        x = x + attn_out
        x = x + MLP(self.cfg, self.fused, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        return (nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED)), cache), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


class Phi3(nn.Module):
    """Phi3ForCausalLM. Returns (float32 logits, updated cache or None).

    `unrolled=True` takes the inference layout (see `inference_layout`): the layers run as a Python
    loop over per-layer parameters `layers_0`, `layers_1`, ... instead of one `nn.scan` over the
    stacked `layers`, with q/k/v and gate/up stored pre-stacked (`fused_weights`). XLA on CPU copies
    each layer's weights out of a stacked array before every matmul, which doubles the memory
    traffic of bandwidth-bound decoding, and it would hoist the q/k/v and gate/up stacking out of
    the decode loop as copies (~70% of the layers' weights again); CPU generation uses this layout.
    """

    cfg: Phi3Config
    unrolled: bool = False

    @nn.compact
    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, *,
                 segment_ids_bt: jax.Array | None = None, long_rope: jax.Array | bool = False,
                 cache: KVCache | None = None, q_offset_b: jax.Array | None = None,
                 logits_index_b: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), _normal(cfg))
        # Gather the table's ZeRO-3 shards before the lookup (as the matmuls do implicitly), so the
        # lookup's output can take the activations' layout without a full rematerialisation.
        x = jnp.take(nn.with_logical_constraint(embed, ("vocab", ACT_EMBED)), tokens_bt, axis=0).astype(dt)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        cos, sin = rope.rope_tables(cfg, positions_bt, long_rope, dt)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        if self.unrolled:
            for i in range(cfg.num_hidden_layers):
                (x, cache), _ = layer_cls(cfg, fused=True, name=f"layers_{i}")(
                    (x, cache), jnp.int32(i), cos, sin, segment_ids_bt, q_offset_b)
        else:
            # The explicit name keeps parameter paths identical with remat on or off.
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, cache), _ = stack(cfg, name="layers")((x, cache), layers, cos, sin, segment_ids_bt, q_offset_b)
        x = RMSNorm(cfg, name="final_norm")(x)

        if logits_index_b is not None:  # only the positions whose next token we need
            x = jnp.take_along_axis(x, logits_index_b[:, None, None], axis=1)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed.astype(dt), preferred_element_type=jnp.float32)
        else:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), _normal(cfg))
            logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, (BATCH, LENGTH, ACT_VOCAB)), cache


# ---------------------------------------------------------------------------- parameters
def _init_variables(cfg: Phi3Config, rng: jax.Array) -> dict[str, Any]:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Phi3(cfg).init(rng, tokens, tokens)


def init_params(cfg: Phi3Config, rng: jax.Array | int = 0) -> Params:
    """Randomly initialised parameters (normal(initializer_range) weights, unit norms)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    boxed = jax.jit(_init_variables, static_argnums=0)(cfg, rng)["params"]
    return nn.meta.unbox(boxed)


def abstract_params(cfg: Phi3Config) -> Params:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct) without allocating anything."""
    boxed = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))["params"]
    return nn.meta.unbox(boxed)


def param_logical_axes(cfg: Phi3Config) -> Params:
    """A PartitionSpec of logical axis names for every parameter."""
    boxed = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))["params"]
    return nn.get_partition_spec(boxed)


def is_inference_layout(params: Params) -> bool:
    """True for the per-layer tree `Phi3(cfg, unrolled=True)` takes, False for the stacked (training) tree."""
    return "layers" not in params and "layers_0" in params


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(stacked: tuple[jax.Array, ...], num_layers: int) -> list[jax.Array]:
    """Leaves [L, ...] -> one array per layer: the leaf's slice, or the leaves' slices stacked on axis 1."""
    if len(stacked) == 1:
        return [stacked[0][i] for i in range(num_layers)]
    return [_stacked(*(x[i] for x in stacked)) for i in range(num_layers)]


def inference_layout(params: Params, cfg: Phi3Config, donate: bool = False) -> Params:
    """The tree `Phi3(cfg, unrolled=True)` takes: `layers` split into `layers_0`, `layers_1`, ...,
    with q/k/v (k/v under GQA) and gate/up stacked as `fused_weights(cfg)` names them.

    donate=True deletes the stacked arrays of `params` as soon as their layers are split, a weight
    (or a fused group, e.g. gate and up) at a time, so the conversion's peak is the weights plus
    that group instead of twice the weights.
    """
    if is_inference_layout(params):
        return params
    num_layers = cfg.num_hidden_layers
    layers: list[dict[str, dict[str, jax.Array]]] = [{} for _ in range(num_layers)]
    fused = fused_weights(cfg)
    for module, group in params["layers"].items():
        stacked_name, stacked = fused.get(module, ("", ()))
        units = [(stacked_name, stacked)] if stacked else []
        for name, parts in units + [(name, (name,)) for name in group if name not in stacked]:
            split = _split_layers(tuple(group[p] for p in parts), num_layers)
            for i in range(num_layers):
                layers[i].setdefault(module, {})[name] = split[i]
            if donate:
                jax.block_until_ready(split)
                for leaf in (group[p] for p in parts):
                    if isinstance(leaf, jax.Array):
                        leaf.delete()
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return out


def count_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------- forward
def check_tokens(tokens: Any, vocab_size: int) -> None:
    """Reject out-of-range token ids (only possible on concrete arrays, outside jit)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise ValueError(f"tokens must be a 2-D [batch, length] array of ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)].ravel()[:5].tolist()
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab_size}); "
                         "check that the tokenizer matches the model")


def segment_positions(segment_ids_bt: jax.Array) -> jax.Array:
    """Position of each token within its segment (restarting at 0 where the id changes)."""
    t = segment_ids_bt.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_bt[:, :1], dtype=bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]],
        axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def _forward(params: Params, cfg: Phi3Config, tokens: jax.Array, positions: jax.Array | None,
             segment_ids: jax.Array | None, padding_mask: jax.Array | None) -> jax.Array:
    tokens = jnp.asarray(tokens, jnp.int32)
    if padding_mask is not None:
        mask = jnp.asarray(padding_mask).astype(bool)
        # Segment id 0 is padding: real tokens never attend to it.
        segment_ids = jnp.where(mask, 1 if segment_ids is None else segment_ids, 0)
        if positions is None:  # as HF's generate does: count only real tokens
            positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 0)
    if positions is None:
        if segment_ids is not None:
            positions = segment_positions(jnp.asarray(segment_ids))
        else:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    positions = jnp.asarray(positions, jnp.int32)
    long_rope = rope.use_long_factors(cfg, jnp.max(positions) + 1)
    logits, _ = Phi3(cfg).apply({"params": params}, tokens, positions, segment_ids_bt=segment_ids,
                                long_rope=long_rope)
    return logits


_forward_jit = jax.jit(_forward, static_argnums=1)


def forward(params: Params, cfg: Phi3Config, tokens: Any, positions: Any = None, segment_ids: Any = None,
            padding_mask: Any = None) -> jax.Array:
    """Logits [B, T, vocab] (float32) for int32 tokens [B, T]. Pure and jit-able.

    positions: [B, T] position ids (default: 0..T-1, restarting per segment, or counting only
    unpadded tokens when `padding_mask` is given). segment_ids: [B, T] document ids for packed
    sequences (tokens attend only within their segment; id 0 marks padding). padding_mask:
    [B, T], 1 for real tokens, 0 for padding. LongRoPE picks its short or long factors from the
    largest position in the batch, as Hugging Face does.
    """
    check_tokens(tokens, cfg.vocab_size)
    return _forward_jit(params, cfg, tokens, positions, segment_ids, padding_mask)
