"""The Phi-3 transformer in Flax linen, and the pure functions around it.

    x = embed(tokens)
    for each layer (one `nn.scan`, so compile time is flat in depth):
        x = x + attn(rmsnorm(x))      # heads explicit, RoPE on q and k
        x = x + mlp(rmsnorm(x))       # down(up * silu(gate))
    logits = lm_head(rmsnorm(x))     # or x @ embed.T when embeddings are tied

Parameters: one layout. Weights that run as one matmul are stacked on a new, unsharded axis, as
gemma does; heads stay an explicit axis, so tensor parallelism shards whole heads.

    embed [vocab, embed]
    layers/attn_norm/scale [embed]                 layers/mlp_norm/scale [embed]
    layers/attn/qkv [embed, 3, heads, head_dim]    (every head has its own k/v), or with GQA
    layers/attn/q [embed, heads, head_dim] and layers/attn/kv [embed, 2, kv_heads, head_dim]
    layers/attn/o [heads, head_dim, embed]
    layers/mlp/gate_up [embed, 2, mlp]             layers/mlp/down [mlp, embed]
    final_norm/scale [embed]                       lm_head [embed, vocab]   (absent when tied)

Everything under `layers` has a leading [layers] axis. `Phi3(cfg, scan_layers=False)` runs the
layers as a Python loop over the same leaves kept per layer (`layers_0`, `layers_1`, ...; see
`unstack_layers`): decoding reads each weight in place instead of slicing it out of the stack.

Every parameter carries logical axis names (`param_logical_axes`) and every large activation a
logical constraint; given a mesh, `phi3jax.parallel` maps those names onto it. Attention goes
through `phi3jax.ops`, which picks the backend; nothing here depends on the platform.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from phi3jax import rope
from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.ops import quant
from phi3jax.ops.attention import attention, decode_attention
from phi3jax.ops.kv_cache import KVCache
from phi3jax.parallel import axes as ax
from phi3jax.parallel import check_model_fits_mesh
from phi3jax.parallel.axes import constrain, rules_for, tree_shardings

Params = dict[str, Any]

REMAT_POLICIES = {  # the names Phi3Config.remat_policy accepts ("none": no remat)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str | None, ...],
           init: Any = None) -> jax.Array:
    cfg: Phi3Config = module.cfg
    init = init or nn.initializers.normal(stddev=cfg.initializer_range)
    return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype))


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str | None, ...],
            n_in: int = 1) -> jax.Array:
    """A projection weight whose first `n_in` axes are contracted. A frozen QLoRA base stores it
    quantized in blocks along its last input axis (`phi3jax.ops.quant`): it is expanded here, inside
    the layer, so no more than one layer's weight is ever in full precision."""
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if quant.is_quantized(stored):
            return quant.dequantize(stored, n_in - 1, jnp.dtype(module.cfg.dtype))
    return _param(module, name, shape, names)


def _lora_in(module: nn.Module, x: jax.Array, target: str, names: tuple[str | None, ...]) -> jax.Array | None:
    """dropout(x) @ A of the adapter on `target` ([B, T, rank]; x's trailing axes are contracted),
    or None when the target has no adapter."""
    lora: LoraConfig | None = module.lora
    if lora is None or target not in lora.targets:
        return None
    n_in = len(names)
    fan_in = int(np.prod(x.shape[x.ndim - n_in:]))
    init = nn.initializers.uniform(scale=2.0 / np.sqrt(fan_in))  # PEFT's kaiming_uniform(a=sqrt(5)) bound

    def init_a(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return init(rng, shape, jnp.float32) - 1.0 / np.sqrt(fan_in)

    a = module.variable("lora", f"{target}_a", nn.with_logical_partitioning(init_a, names + (None,)),
                        module.make_rng("params") if module.is_initializing() else None,
                        x.shape[x.ndim - n_in:] + (lora.rank,)).value
    if lora.dropout > 0 and module.has_rng("dropout"):
        x = nn.Dropout(lora.dropout, deterministic=False)(x, rng=module.make_rng("dropout"))
    return jnp.tensordot(x, a.astype(x.dtype), axes=n_in)


def _lora_out(module: nn.Module, z_btr: jax.Array | None, name: str, out_shape: tuple[int, ...],
              names: tuple[str | None, ...]) -> jax.Array | float:
    """scale * z @ B for the adapter output `name` (B [rank, *out_shape], zero at init), or 0."""
    if z_btr is None:
        return 0.0
    lora: LoraConfig = module.lora
    b = module.variable("lora", name, nn.with_logical_partitioning(nn.initializers.zeros, (None,) + names),
                        None, (lora.rank,) + out_shape, jnp.float32).value
    return jnp.tensordot(z_btr, (b * lora.scale).astype(z_btr.dtype), axes=1)


def _constrain(module: nn.Module, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    if module.mesh is None:
        return x
    return constrain(x, names, module.mesh, rules_for(module.cfg.num_key_value_heads, module.mesh))


class RMSNorm(nn.Module):
    """RMSNorm as HF computes it: normalise in float32, cast back, then scale."""

    cfg: Phi3Config

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x_btd.shape[-1],), (ax.NORM,), nn.initializers.ones)
        x32 = x_btd.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return x32.astype(x_btd.dtype) * scale.astype(x_btd.dtype)


def _project(x_btd: jax.Array, w_dn: jax.Array, delta: jax.Array | float = 0.0) -> list[jax.Array]:
    """x @ w (+ a LoRA delta) for each weight of a stack w [D, n, ...]: one matmul, split on the
    stacked axis."""
    out = jnp.einsum("btd,dn...->btn...", x_btd, w_dn.astype(x_btd.dtype)) + delta
    return [out[:, :, i] for i in range(w_dn.shape[1])]


class Attention(nn.Module):
    """Self-attention with GQA and RoPE. With a cache: writes this call's keys and values, and with
    `cache_offset_b` (decoding) attends each row's one new token to its cached sequence."""

    cfg: Phi3Config
    mesh: Any = None
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids_bt: jax.Array | None,
                 cache: KVCache | None, layer: jax.Array, cache_offset_b: jax.Array | None
                 ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        z = _lora_in(self, x_btd, "qkv", (ax.EMBED,))  # one A for q, k and v, as PEFT's qkv_proj
        if h == kv:
            names = (None, ax.HEADS, ax.HEAD_DIM)
            q, k, v = _project(x_btd, _weight(self, "qkv", (d, 3, h, hd), (ax.EMBED, *names)),
                               _lora_out(self, z, "qkv_b", (3, h, hd), names))
        else:
            w_q = _weight(self, "q", (d, h, hd), (ax.EMBED, ax.HEADS, ax.HEAD_DIM))
            dq = _lora_out(self, z, "q_b", (h, hd), (ax.HEADS, ax.HEAD_DIM))
            (q,) = _project(x_btd, w_q[:, None], dq if z is None else dq[:, :, None])
            names = (None, ax.KV_HEADS, ax.HEAD_DIM)
            k, v = _project(x_btd, _weight(self, "kv", (d, 2, kv, hd), (ax.EMBED, *names)),
                            _lora_out(self, z, "kv_b", (2, kv, hd), names))
        w_o = _weight(self, "o", (h, hd, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), n_in=2)
        q = _constrain(self, rope.apply_rope(q, cos, sin), (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, ax.HEAD_DIM))
        k = _constrain(self, rope.apply_rope(k, cos, sin), (ax.BATCH, ax.LENGTH, ax.ACT_KV_HEADS, ax.HEAD_DIM))
        v = _constrain(self, v, (ax.BATCH, ax.LENGTH, ax.ACT_KV_HEADS, ax.HEAD_DIM))

        if cache is not None:
            offset_b = jnp.zeros((x_btd.shape[0],), jnp.int32) if cache_offset_b is None else cache_offset_b
            cache = cache.write(layer, k, v, offset_b)
        if cache_offset_b is None:  # the tokens attend to each other (training, scoring, prefill)
            out = attention(q, k, v, segment_ids_bt=segment_ids_bt, sliding_window=cfg.sliding_window,
                            impl=cfg.attention_impl, mesh=self.mesh)
        else:  # decoding: each row's new token against its cached keys and values
            if q.shape[1] != 1:
                raise ValueError(f"decoding takes one new token per row, got {q.shape[1]}")
            k_all, v_all = cache.layer(layer)
            out = decode_attention(q[:, 0], k_all, v_all, cache_offset_b + 1, sliding_window=cfg.sliding_window,
                                   impl=cfg.attention_impl, mesh=self.mesh)[:, None]
        out = checkpoint_name(out, "attn_out")
        y = jnp.einsum("bthk,hkd->btd", out, w_o.astype(x_btd.dtype))
        y = y + _lora_out(self, _lora_in(self, out, "o", (ax.HEADS, ax.HEAD_DIM)), "o_b", (d,), (ax.EMBED,))
        return _constrain(self, y, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED)), cache


class MLP(nn.Module):
    """down(up * silu(gate)), gate and up as one stacked weight `gate_up` [embed, 2, mlp]."""

    cfg: Phi3Config
    mesh: Any = None
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        d, i = self.cfg.hidden_size, self.cfg.intermediate_size
        z = _lora_in(self, x_btd, "gate_up", (ax.EMBED,))
        gate, up = _project(x_btd, _weight(self, "gate_up", (d, 2, i), (ax.EMBED, None, ax.MLP)),
                            _lora_out(self, z, "gate_up_b", (2, i), (None, ax.MLP)))
        hidden = _constrain(self, up * nn.silu(gate), (ax.BATCH, ax.LENGTH, ax.ACT_MLP))
        y = jnp.einsum("btf,fd->btd", hidden, _weight(self, "down", (i, d), (ax.MLP, ax.EMBED)).astype(x_btd.dtype))
        y = y + _lora_out(self, _lora_in(self, hidden, "down", (ax.MLP,)), "down_b", (d,), (ax.EMBED,))
        return _constrain(self, y, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))


class DecoderLayer(nn.Module):
    """One pre-norm block: (carry, layer index, broadcast args...), as `nn.scan` calls it."""

    cfg: Phi3Config
    mesh: Any = None
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, KVCache | None], layer: jax.Array, cos: jax.Array,
                 sin: jax.Array, segment_ids_bt: jax.Array | None, cache_offset_b: jax.Array | None):
        x, cache = carry
        attn_out, cache = Attention(self.cfg, self.mesh, self.lora, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x), cos, sin, segment_ids_bt, cache, layer, cache_offset_b)
        x = x + attn_out
        x = x + MLP(self.cfg, self.mesh, self.lora, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        return (_constrain(self, x, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED)), cache), None


class Phi3(nn.Module):
    """Phi3ForCausalLM. Returns (float32 logits, the updated cache or None).

    mesh: the Mesh the computation is laid out on (None: one device); activation constraints and
    the attention backend follow it. scan_layers: one `nn.scan` over the stacked `layers` (training;
    compile time flat in depth), or a Python loop over per-layer `layers_<i>` (decoding).
    """

    cfg: Phi3Config
    mesh: Any = None
    scan_layers: bool = True
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array, *,
                 segment_ids_bt: jax.Array | None = None, long_rope: jax.Array | bool = False,
                 cache: KVCache | None = None, cache_offset_b: jax.Array | None = None,
                 logits_index_b: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        embed = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), (ax.VOCAB, ax.EMBED))
        # Gather the table's ZeRO-3 shards before the lookup (as the matmuls do implicitly), so the
        # lookup's output can take the activations' layout without a full rematerialisation.
        x = jnp.take(_constrain(self, embed, (ax.VOCAB, ax.ACT_EMBED)), tokens_bt, axis=0).astype(dt)
        x = _constrain(self, x, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
        cos, sin = rope.rope_tables(cfg, positions_bt, long_rope, dt)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        args = (cos, sin, segment_ids_bt, cache_offset_b)
        if self.scan_layers:
            # No broadcast outputs, so flax's extra trace that checks them is skipped: it would keep
            # effectful ops (a Pallas call) alive and reject the scan body.
            stack = nn.scan(layer_cls, variable_axes={"params": 0, "lora": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: ax.LAYERS},
                            check_constancy_invariants=False)
            layers = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            (x, cache), _ = stack(cfg, self.mesh, self.lora, name="layers")((x, cache), layers, *args)
        else:
            for i in range(cfg.num_hidden_layers):
                layer = layer_cls(cfg, self.mesh, self.lora, name=f"layers_{i}")
                (x, cache), _ = layer((x, cache), jnp.int32(i), *args)
        x = RMSNorm(cfg, name="final_norm")(x)

        if logits_index_b is not None:  # only the positions whose next token is needed
            x = jnp.take_along_axis(x, logits_index_b[:, None, None], axis=1)
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed.astype(dt), preferred_element_type=jnp.float32)
        else:
            head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), (ax.EMBED, ax.VOCAB))
            logits = jnp.einsum("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
        return _constrain(self, logits, (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB)), cache


# ---------------------------------------------------------------------------- parameters
def _init_variables(cfg: Phi3Config, rng: jax.Array, scan_layers: bool = True) -> dict[str, Any]:
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Phi3(cfg, scan_layers=scan_layers).init(rng, tokens, tokens)


def init_params(cfg: Phi3Config, rng: jax.Array | int = 0) -> Params:
    """Randomly initialised parameters (normal(initializer_range) weights, unit norms), layers stacked."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    boxed = jax.jit(_init_variables, static_argnums=0)(cfg, rng)["params"]
    return nn.meta.unbox(boxed)


def abstract_params(cfg: Phi3Config) -> Params:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct) without allocating anything."""
    boxed = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0)))["params"]
    return nn.meta.unbox(boxed)


def param_logical_axes(cfg: Phi3Config, scan_layers: bool = True) -> Params:
    """A PartitionSpec of logical axis names for every parameter."""
    boxed = jax.eval_shape(lambda: _init_variables(cfg, jax.random.key(0), scan_layers))["params"]
    return nn.get_partition_spec(boxed)


def param_shardings(cfg: Phi3Config, mesh: Any, scan_layers: bool = True) -> Params:
    """A NamedSharding on `mesh` for every parameter, from its logical axes and the rules (after
    checking that the mesh can shard this model)."""
    check_model_fits_mesh(cfg, mesh)
    return tree_shardings(param_logical_axes(cfg, scan_layers), mesh, rules_for(cfg.num_key_value_heads, mesh))


def layers_stacked(params: Params) -> bool:
    """True for the stacked tree (`layers`), False for per-layer subtrees (`layers_0`, ...)."""
    return "layers" in params


@jax.jit
def _split(x: jax.Array) -> list[jax.Array]:
    return [x[i] for i in range(x.shape[0])]


def unstack_layers(params: Params, donate: bool = False) -> Params:
    """The same leaves with `layers` split into `layers_0`, `layers_1`, ... (for scan_layers=False).

    donate=True deletes each stacked leaf as soon as it is split, so the peak is the weights plus
    one leaf instead of twice the weights (`params` must not be used afterwards).
    """
    if not layers_stacked(params):
        return params
    paths, treedef = jax.tree_util.tree_flatten_with_path(params["layers"])
    n = paths[0][1].shape[0]
    per_layer: list[list[jax.Array]] = [[] for _ in range(n)]
    for _, leaf in paths:
        for i, piece in enumerate(_split(leaf) if isinstance(leaf, jax.Array) else [leaf[i] for i in range(n)]):
            per_layer[i].append(piece)
        if donate and isinstance(leaf, jax.Array):
            jax.block_until_ready(per_layer[-1][-1])
            leaf.delete()
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers_{i}": jax.tree_util.tree_unflatten(treedef, leaves) for i, leaves in enumerate(per_layer)})
    return out


def stack_layers(params: Params) -> Params:
    """The inverse of `unstack_layers`."""
    if layers_stacked(params):
        return params
    per_layer = [params[f"layers_{i}"] for i in range(sum(k.startswith("layers_") for k in params))]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
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


def logits_fn(params: Params, cfg: Phi3Config, tokens: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None, padding_mask: jax.Array | None = None,
              mesh: Any = None) -> jax.Array:
    """`forward`'s computation, traceable (no checks on concrete values): what jitted callers use."""
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
    logits, _ = Phi3(cfg, mesh, layers_stacked(params)).apply({"params": params}, tokens, positions,
                                                              segment_ids_bt=segment_ids, long_rope=long_rope)
    return logits


_logits_jit = jax.jit(logits_fn, static_argnames=("cfg", "mesh"))


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
    return _logits_jit(params, cfg, tokens, positions, segment_ids, padding_mask)
