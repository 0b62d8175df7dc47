"""The loss, the optimiser and one training step: pure functions, jit- and mesh-ready.

A batch is a dict of [B, T] arrays: `inputs`, `targets`, `loss_mask`, `segment_ids`, `positions`
(`phi3jax.train.batch` says what each holds).

LoRA: `params` (what is trained) are the adapters, `frozen` the base they modify, `lora` their
settings; the gradient, the optimiser and the checkpoints see only the adapters.

The loss is the mean token NLL over all counted tokens of the global batch. With gradient
accumulation the batch is split into `accum_steps` micro-batches whose *summed* NLL and
token counts are accumulated, so the result equals one step on the whole batch exactly
(up to float summation order), whatever the padding of each micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from phi3jax import rope
from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.model import Params, Phi3

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to `min_lr_ratio * learning_rate`."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # apply weight decay to embed / lm_head
    decay_norms: bool = False  # apply weight decay to RMSNorm scales
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    accum_steps: int = 1  # micro-batches per optimiser step

    def __post_init__(self) -> None:
        checks = [("learning_rate", self.learning_rate > 0), ("warmup_steps", self.warmup_steps >= 0),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1), ("b1", 0 <= self.b1 < 1),
                  ("b2", 0 <= self.b2 < 1), ("eps", self.eps > 0), ("weight_decay", self.weight_decay >= 0),
                  ("clip_norm", self.clip_norm >= 0), ("accum_steps", self.accum_steps >= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"optim.{name}={getattr(self, name)!r} is out of range")


def learning_rate_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim.learning_rate, peak_value=optim.learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=optim.learning_rate * optim.min_lr_ratio)


def weight_decay_mask(params: Params, optim: OptimConfig) -> Any:
    """True for leaves that get weight decay: matrices, and embeddings/norms only if configured."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = [getattr(p, "key", str(p)) for p in path]
        if names[0] in ("embed", "lm_head"):
            return optim.decay_embeddings
        if names[-1] == "scale":
            return optim.decay_norms
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim, total_steps)
    chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=lambda p: weight_decay_mask(p, optim)))
    return optax.chain(*chain)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    opt_state: optax.OptState


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def token_nll(params: Params, cfg: Phi3Config, batch: Batch, mesh: Any = None, *, frozen: Params | None = None,
              lora: LoraConfig | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Per-token negative log-likelihood [B, T] (float32) of batch['targets']. mesh: the Mesh the
    batch and parameters are laid out on (None: one device). With `lora`, `params` are the adapters
    on the base `frozen`; `rng` drives their dropout (None: no dropout)."""
    positions = batch["positions"]
    long_rope = rope.use_long_factors(cfg, jnp.max(positions) + 1)
    variables = {"params": params} if lora is None else {"params": frozen, "lora": params}
    logits, _ = Phi3(cfg, mesh, lora=lora).apply(variables, batch["inputs"], positions,
                                                 segment_ids_bt=batch["segment_ids"], long_rope=long_rope,
                                                 rngs={"dropout": rng} if rng is not None else None)
    # logsumexp minus the target's logit, over a [B*T, V] view: the same value as
    # optax.softmax_cross_entropy_with_integer_labels, with a ~20% cheaper backward on CPU (no full
    # log-softmax materialised for the gradient).
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)
    target = jnp.take_along_axis(flat, batch["targets"].reshape(b * t, 1), axis=-1)[:, 0]
    return (jax.nn.logsumexp(flat, axis=-1) - target).reshape(b, t)


def loss_sums(params: Params, cfg: Phi3Config, batch: Batch, mesh: Any = None, **lora_args: Any
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of counted token NLLs, number of counted tokens); `lora_args` as `token_nll`'s."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_nll(params, cfg, batch, mesh, **lora_args) * mask), jnp.sum(mask)


def _split_micro(batch: Batch, k: int) -> Batch:
    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by optim.accum_steps={k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return {key: split(value) for key, value in batch.items()}


def accumulate(sums_fn: Any, params: Params, batch: Batch, accum_steps: int = 1, rng: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array], Params]:
    """(summed loss, summed aux, gradient of the *mean* loss) over `accum_steps` micro-batches.

    `sums_fn(params, micro_batch, rng) -> (loss sum, {"count": what the mean divides by, ...})`;
    micro-batch k's rng is fold_in(rng, k). Sums, not means, are accumulated, so the result equals
    one pass over the whole batch whatever each micro-batch holds."""
    grad_fn = jax.value_and_grad(sums_fn, has_aux=True)
    if accum_steps == 1:
        (total, sums), grads = grad_fn(params, batch, rng)
    else:
        def body(carry: tuple[jax.Array, dict[str, jax.Array], Params], micro: tuple[jax.Array, Batch]):
            total, sums, grads = carry
            k, micro_batch = micro
            micro_rng = None if rng is None else jax.random.fold_in(rng, k)
            (t, s), g = grad_fn(params, micro_batch, micro_rng)
            return (total + t, jax.tree.map(jnp.add, sums, s), jax.tree.map(jnp.add, grads, g)), None

        micro = (jnp.arange(accum_steps), _split_micro(batch, accum_steps))
        first = jax.tree.map(lambda x: x[0], micro[1])
        _, sums_shape = jax.eval_shape(sums_fn, params, first, rng)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape), zeros)
        (total, sums, grads), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return total, sums, grads


def loss_and_grads(params: Params, cfg: Phi3Config, batch: Batch, accum_steps: int = 1, mesh: Any = None,
                   frozen: Params | None = None, lora: LoraConfig | None = None, rng: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, Params]:
    """(mean loss, counted tokens, gradient of the mean loss wrt `params`), accumulated over
    micro-batches (micro-batch k's dropout uses fold_in(rng, k))."""
    def sums_fn(p: Params, micro: Batch, micro_rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        total, count = loss_sums(p, cfg, micro, mesh, frozen=frozen, lora=lora, rng=micro_rng)
        return total, {"count": count}

    total, sums, grads = accumulate(sums_fn, params, batch, accum_steps, rng)
    return total / jnp.maximum(sums["count"], 1.0), sums["count"], grads


def apply_gradients(state: TrainState, grads: Params, optimizer: optax.GradientTransformation
                    ) -> tuple[TrainState, jax.Array]:
    """(the state after one optimiser update, the gradient's global norm)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), optax.tree.norm(grads)


def train_step(state: TrainState, batch: Batch, cfg: Phi3Config, optimizer: optax.GradientTransformation,
               accum_steps: int = 1, mesh: Any = None, frozen: Params | None = None, lora: LoraConfig | None = None,
               seed: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step. jit with cfg, optimizer, accum_steps, mesh, lora and seed static. With
    `lora`, the state holds the adapters and `frozen` the base; LoRA dropout draws from
    fold_in(key(seed), step), so a resumed run repeats the same masks."""
    rng = None
    if lora is not None and lora.dropout > 0:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
    loss, count, grads = loss_and_grads(state.params, cfg, batch, accum_steps, mesh, frozen, lora, rng)
    state, grad_norm = apply_gradients(state, grads, optimizer)
    return state, {"loss": loss, "tokens": count, "grad_norm": grad_norm}
