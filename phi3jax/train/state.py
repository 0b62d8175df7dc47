"""The train state on a mesh: where every leaf lives, how it is born sharded, and the jitted steps.

    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    state = sharded_init(cfg, mesh, optimizer, rng)         # born sharded, never whole
    step = make_train_step(cfg, mesh, optimizer)
    state, metrics = step(state, put_batch(batch, mesh))

The shardings come from the model's logical axis names and the rules of `phi3jax.parallel`;
the mesh is passed to the model explicitly, so nothing depends on an ambient mesh context.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from phi3jax import lora as lora_lib
from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.model import Params, Phi3, abstract_params, param_shardings
from phi3jax.parallel import batch_sharding
from phi3jax.train.dpo import DpoConfig, dpo_train_step, pair_logps, preference_sums
from phi3jax.train.step import TrainState, init_train_state, loss_sums, token_nll, train_step


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def trained_shardings(cfg: Phi3Config, mesh: Mesh, lora: LoraConfig | None = None) -> Params:
    """Shardings of what is trained: the parameters, or with `lora` the adapters."""
    return param_shardings(cfg, mesh) if lora is None else lora_lib.adapter_shardings(cfg, lora, mesh)


def trained_abstract(cfg: Phi3Config, lora: LoraConfig | None = None) -> Params:
    return abstract_params(cfg) if lora is None else lora_lib.abstract_adapters(cfg, lora)


def state_shardings(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                    lora: LoraConfig | None = None) -> TrainState:
    """TrainState of shardings: parameters (or adapters) by the rules, optimiser moments like
    their parameters, scalars (step, counts) replicated."""
    p_shard = trained_shardings(cfg, mesh, lora)
    abstract = jax.eval_shape(optimizer.init, trained_abstract(cfg, lora))
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract, p_shard,
                                      transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=p_shard, opt_state=opt_shard)


def abstract_state(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                   lora: LoraConfig | None = None) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the whole train state: what an ahead-of-time compile
    lowers on, and the target of a restore onto `mesh`."""
    shapes = jax.eval_shape(lambda params: init_train_state(params, optimizer), trained_abstract(cfg, lora))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, state_shardings(cfg, mesh, optimizer, lora))


def sharded_lora_init(cfg: Phi3Config, lora: LoraConfig, mesh: Mesh, optimizer: optax.GradientTransformation,
                      rng: jax.Array | int = 0, adapters: Params | None = None) -> TrainState:
    """A LoRA TrainState born sharded: fresh adapters (or `adapters`) and their optimiser state."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    shardings = state_shardings(cfg, mesh, optimizer, lora)
    if adapters is None:
        adapters = jax.jit(lambda r: lora_lib.init_adapters(cfg, lora, r), out_shardings=shardings.params)(rng)
    return jax.jit(lambda a: init_train_state(a, optimizer), out_shardings=shardings)(adapters)


def sharded_init(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                 rng: jax.Array | int = 0) -> TrainState:
    """A TrainState whose params and optimiser state are created directly in their sharded layout.

    One jit with out_shardings: XLA partitions the initialisers, so each device computes only
    its own shards (threefry is partitionable, so the values do not depend on the mesh).
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng)

    def init(rng: jax.Array) -> TrainState:
        boxed = Phi3(cfg).init(rng, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))
        return init_train_state(nn.meta.unbox(boxed["params"]), optimizer)

    return jax.jit(init, out_shardings=state_shardings(cfg, mesh, optimizer))(rng)


def state_at_step(params: Params, opt_state: Any, step: int, mesh: Mesh) -> TrainState:
    """A TrainState from placed parameters and optimiser state, its step counter replicated on `mesh`."""
    step0 = jax.make_array_from_callback((), replicated(mesh), lambda _: np.asarray(step, np.int32))
    return TrainState(step=step0, params=params, opt_state=opt_state)


def make_train_step(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                    accum_steps: int = 1, donate: bool = True, lora: LoraConfig | None = None, seed: int = 0) -> Any:
    """`state, metrics = step(state, batch)` over `mesh` (with `lora`: `step(state, batch, frozen)`,
    the base as the third argument, never donated): the shardings fixed, the state donated
    (updated in place). `.lower(...)` takes ShapeDtypeStructs too (an ahead-of-time compile for a
    topology that is not attached)."""
    shardings = state_shardings(cfg, mesh, optimizer, lora)
    out = (shardings, replicated(mesh))
    donate_argnums = (0,) if donate else ()
    if lora is None:
        def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
            return train_step(state, batch, cfg, optimizer, accum_steps, mesh)

        return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=out,
                       donate_argnums=donate_argnums)

    def lora_step(state: TrainState, batch: dict[str, jax.Array], frozen: Params
                  ) -> tuple[TrainState, dict[str, jax.Array]]:
        return train_step(state, batch, cfg, optimizer, accum_steps, mesh, frozen, lora, seed)

    return jax.jit(lora_step, in_shardings=(shardings, batch_sharding(mesh), lora_lib.base_shardings(cfg, lora, mesh)),
                   out_shardings=out, donate_argnums=donate_argnums)


def make_eval_step(cfg: Phi3Config, mesh: Mesh, lora: LoraConfig | None = None) -> Any:
    """`(nll_sum, count) = eval_step(params, batch)` over `mesh` (with `lora`:
    `eval_step(adapters, batch, frozen)`)."""
    if lora is None:
        return jax.jit(lambda params, batch: loss_sums(params, cfg, batch, mesh),
                       in_shardings=(param_shardings(cfg, mesh), batch_sharding(mesh)), out_shardings=replicated(mesh))
    return jax.jit(lambda adapters, batch, frozen: loss_sums(adapters, cfg, batch, mesh, frozen=frozen, lora=lora),
                   in_shardings=(trained_shardings(cfg, mesh, lora), batch_sharding(mesh),
                                 lora_lib.base_shardings(cfg, lora, mesh)), out_shardings=replicated(mesh))


# ----------------------------------------------------------------------------- preference tuning
def reference_shardings(cfg: Phi3Config, mesh: Mesh, dpo: DpoConfig, lora: LoraConfig | None = None) -> Any:
    """Shardings of the `ref_params` a DPO step takes: the parameters (a frozen copy), with LoRA the
    initial adapters' copy; None where the reference needs no weights of its own."""
    if not dpo.uses_reference or dpo.reference != "frozen":
        return None
    return trained_shardings(cfg, mesh, lora)


def make_dpo_step(cfg: Phi3Config, mesh: Mesh, optimizer: optax.GradientTransformation, dpo: DpoConfig,
                  accum_steps: int = 1, donate: bool = True, lora: LoraConfig | None = None, seed: int = 0) -> Any:
    """`state, metrics = step(state, batch, frozen, ref_params)` for `objective: dpo` over `mesh`:
    `frozen` the LoRA base (else None), `ref_params` the frozen reference (`reference_shardings`;
    else None); neither is donated."""
    shardings = state_shardings(cfg, mesh, optimizer, lora)
    base = lora_lib.base_shardings(cfg, lora, mesh) if lora is not None else None

    def step(state: TrainState, batch: dict[str, jax.Array], frozen: Params | None, ref_params: Params | None):
        return dpo_train_step(state, batch, cfg, optimizer, dpo, accum_steps, mesh, frozen, ref_params, lora, seed)

    ref = reference_shardings(cfg, mesh, dpo, lora)
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), base, ref),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,) if donate else ())


def make_dpo_eval_step(cfg: Phi3Config, mesh: Mesh, dpo: DpoConfig, lora: LoraConfig | None = None) -> Any:
    """`(loss_sum, sums) = eval_step(params, batch, frozen, ref_params)`: the preference loss and
    metric sums over the pairs of a batch (`phi3jax.train.dpo.preference_sums`)."""
    base = lora_lib.base_shardings(cfg, lora, mesh) if lora is not None else None

    def sums(params: Params, batch: dict[str, jax.Array], frozen: Params | None, ref_params: Params | None):
        return preference_sums(params, cfg, batch, dpo, mesh, ref_params=ref_params, frozen=frozen, lora=lora)

    return jax.jit(sums, in_shardings=(trained_shardings(cfg, mesh, lora), batch_sharding(mesh), base,
                                       reference_shardings(cfg, mesh, dpo, lora)), out_shardings=replicated(mesh))


def make_logps_step(cfg: Phi3Config, mesh: Mesh, lora: LoraConfig | None = None) -> Any:
    """`(logps, counts) = step(params, batch, frozen)`: each pair's chosen and rejected completion
    log-probabilities [B, T/2, 2] and token counts, replicated (with `lora`: `params` the adapters
    on the base `frozen`; `params` None with a base: the base alone)."""
    def logps(params: Params | None, batch: dict[str, jax.Array], frozen: Params | None):
        if params is None:
            nll = token_nll(frozen, cfg, batch, mesh)
        else:
            nll = token_nll(params, cfg, batch, mesh, frozen=frozen, lora=lora)
        return pair_logps(-nll, batch)

    return jax.jit(logps, out_shardings=replicated(mesh))
