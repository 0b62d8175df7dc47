"""Preference optimisation: DPO, its IPO / hinge / robust variants and the reference-free SimPO.

The losses, rewards and metric names are TRL's (trl 1.16: `DPOTrainer`, and `CPOTrainer` for SimPO).
With delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), log-probabilities
summed over the completion tokens:

    sigmoid   -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)  (eps > 0: conservative DPO)
    hinge     relu(1 - beta delta)
    ipo       (delta_avg - 1 / (2 beta))^2, delta_avg from per-token averages (TRL's normalisation)
    robust    (-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)) / (1 - 2 eps)
    simpo     -(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x), x = avg_chosen - avg_rejected - gamma / beta

Rewards are beta * (policy - reference) (SimPO: beta * the policy's average log-probability).
The loss of a batch is the mean over its pairs; with gradient accumulation the per-pair sums are
accumulated, as the token sums of the language-model loss are (`phi3jax.train.step`).

A batch holds whole pairs packed in rows (`phi3jax.train.preference`): segment 2k+1 is pair k's
chosen sequence, 2k+2 its rejected one, so one forward pass scores both. The reference is either
a second set of weights scored in the same step (`frozen`; with LoRA, a copy of the initial
adapters on the shared base), the base with the adapters off (`adapter_off`), or log-probabilities
computed once before training and carried in the batch (`precomputed`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.model import Params
from phi3jax.train.preference import REF_KEY, TRUNCATION_MODES
from phi3jax.train.step import Batch, TrainState, accumulate, apply_gradients, token_nll

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
DPO_REFERENCES = ("frozen", "precomputed", "adapter_off")
SMOOTHED_LOSSES = ("sigmoid", "robust", "simpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """The `dpo:` section of a training config (used with `objective: dpo`)."""

    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo
    label_smoothing: float = 0.0  # sigmoid (conservative DPO), robust, simpo
    reference: str = "frozen"  # frozen | precomputed | adapter_off (LoRA); SimPO has none
    gamma: float = 0.5  # SimPO's target reward margin (TRL's simpo_gamma)
    max_length: int | None = None  # tokens of prompt + completion per sequence; None: seq_len // 2
    max_prompt_length: int | None = None  # keep the prompt's last tokens first (None: no limit)
    truncation_mode: str = "keep_start"  # keep_start | keep_end (TRL's collator)

    def __post_init__(self) -> None:
        checks = [("beta", self.beta > 0, "must be > 0"),
                  ("loss", self.loss in DPO_LOSSES, f"must be one of {DPO_LOSSES}"),
                  ("reference", self.reference in DPO_REFERENCES, f"must be one of {DPO_REFERENCES}"),
                  ("truncation_mode", self.truncation_mode in TRUNCATION_MODES, f"must be one of {TRUNCATION_MODES}"),
                  ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
                  ("label_smoothing", self.label_smoothing == 0 or self.loss in SMOOTHED_LOSSES,
                   f"applies to dpo.loss in {SMOOTHED_LOSSES} (TRL's definitions), not {self.loss!r}"),
                  ("gamma", self.gamma >= 0, "must be >= 0"),
                  ("max_length", self.max_length is None or self.max_length >= 2, "must be >= 2"),
                  ("max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1,
                   "must be >= 1")]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"dpo.{name}={getattr(self, name)!r}: {what}")

    @property
    def uses_reference(self) -> bool:
        return self.loss != "simpo"

    def length_limit(self, seq_len: int) -> int:
        """Tokens per sequence: a pair's two sequences share one row of seq_len positions."""
        return self.max_length if self.max_length is not None else seq_len // 2


# ----------------------------------------------------------------------------- per-sequence sums
def sequence_sums(values_bt: jax.Array, segment_ids_bt: jax.Array) -> jax.Array:
    """[B, T] -> [B, T]: the sum of `values` over each segment of a row (slot s = segment s + 1;
    padding, segment 0, is dropped)."""
    t = values_bt.shape[1]
    slots = jnp.where(segment_ids_bt > 0, segment_ids_bt - 1, t)  # out of range: dropped

    def row(values: jax.Array, ids: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(values, ids, num_segments=t)

    return jax.vmap(row)(values_bt.astype(jnp.float32), slots)


def pair_logps(token_logp_bt: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(log-probabilities [B, T/2, 2] of each pair's chosen and rejected completions, their
    completion token counts [B, T/2, 2])."""
    mask = batch["loss_mask"].astype(jnp.float32)
    b, t = mask.shape
    sums = sequence_sums(token_logp_bt * mask, batch["segment_ids"])
    counts = sequence_sums(mask, batch["segment_ids"])
    return sums[:, : t - t % 2].reshape(b, -1, 2), counts[:, : t - t % 2].reshape(b, -1, 2)


def preference_terms(policy: jax.Array, reference: jax.Array | None, counts: jax.Array, dpo: DpoConfig
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [...] and TRL's per-pair metrics from [..., 2] (chosen, rejected) log-probabilities."""
    beta, eps = dpo.beta, dpo.label_smoothing
    avg = policy / jnp.maximum(counts, 1.0)
    if dpo.loss == "simpo":
        x = avg[..., 0] - avg[..., 1] - dpo.gamma / beta
        loss = -(1 - eps) * jax.nn.log_sigmoid(beta * x) - eps * jax.nn.log_sigmoid(-beta * x)
        rewards, logps = beta * avg, avg
    else:
        ratio = policy - reference
        delta = ratio[..., 0] - ratio[..., 1]
        if dpo.loss == "sigmoid":
            loss = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
        elif dpo.loss == "hinge":
            loss = jax.nn.relu(1 - beta * delta)
        elif dpo.loss == "ipo":
            avg_ratio = ratio / jnp.maximum(counts, 1.0)
            loss = (avg_ratio[..., 0] - avg_ratio[..., 1] - 1 / (2 * beta)) ** 2
        else:  # robust
            loss = (-(1 - eps) * jax.nn.log_sigmoid(beta * delta)
                    + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
        rewards, logps = beta * ratio, policy
    rewards = jax.lax.stop_gradient(rewards)
    metrics = {"rewards/chosen": rewards[..., 0], "rewards/rejected": rewards[..., 1],
               "rewards/accuracies": (rewards[..., 0] > rewards[..., 1]).astype(jnp.float32),
               "rewards/margins": rewards[..., 0] - rewards[..., 1],
               "logps/chosen": jax.lax.stop_gradient(logps[..., 0]),
               "logps/rejected": jax.lax.stop_gradient(logps[..., 1])}
    return loss, metrics


# ----------------------------------------------------------------------------- the objective
def reference_logps(batch: Batch, cfg: Phi3Config, dpo: DpoConfig, mesh: Any = None, *, ref_params: Params = None,
                    frozen: Params | None = None, lora: LoraConfig | None = None) -> jax.Array | None:
    """The reference's [B, T/2, 2] log-probabilities (no gradient), or None for SimPO."""
    if not dpo.uses_reference:
        return None
    if dpo.reference == "precomputed":
        b, t = batch["segment_ids"].shape
        return sequence_sums(batch[REF_KEY], batch["segment_ids"])[:, : t - t % 2].reshape(b, -1, 2)
    if dpo.reference == "adapter_off":  # the base alone: no adapters, no second copy of anything
        nll = token_nll(frozen, cfg, batch, mesh)
    else:  # frozen: a copy of the initial weights (with LoRA: of the initial adapters, on the same base)
        nll = token_nll(ref_params, cfg, batch, mesh, frozen=frozen, lora=lora)
    return jax.lax.stop_gradient(pair_logps(-nll, batch)[0])


def preference_sums(params: Params, cfg: Phi3Config, batch: Batch, dpo: DpoConfig, mesh: Any = None, *,
                    ref_params: Params = None, frozen: Params | None = None, lora: LoraConfig | None = None,
                    rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum of the pairs' losses, {"count": pairs, "tokens": completion tokens, metric: sum over pairs})."""
    nll = token_nll(params, cfg, batch, mesh, frozen=frozen, lora=lora, rng=rng)
    policy, counts = pair_logps(-nll, batch)
    ref = reference_logps(batch, cfg, dpo, mesh, ref_params=ref_params, frozen=frozen, lora=lora)
    loss, metrics = preference_terms(policy, ref, counts, dpo)
    valid = (counts.sum(-1) > 0).astype(jnp.float32)
    sums = {name: jnp.sum(value * valid) for name, value in metrics.items()}
    sums.update(count=jnp.sum(valid), tokens=jnp.sum(counts))
    return jnp.sum(loss * valid), sums


def pair_means(total: jax.Array, sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The loss and metrics as means over the pairs (TRL's batch means)."""
    n = jnp.maximum(sums["count"], 1.0)
    return {"loss": total / n, **{name: sums[name] / n for name in METRICS}, "pairs": sums["count"],
            "tokens": sums["tokens"]}


def dpo_train_step(state: TrainState, batch: Batch, cfg: Phi3Config, optimizer: optax.GradientTransformation,
                   dpo: DpoConfig, accum_steps: int = 1, mesh: Any = None, frozen: Params | None = None,
                   ref_params: Params = None, lora: LoraConfig | None = None, seed: int = 0
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the preference loss (mean over the batch's pairs). jit with cfg, optimizer,
    dpo, accum_steps, mesh, lora and seed static; `frozen`: the LoRA base, `ref_params`: the frozen
    reference (see `reference_logps`)."""
    rng = None
    if lora is not None and lora.dropout > 0:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def sums_fn(params: Params, micro: Batch, micro_rng: jax.Array | None):
        return preference_sums(params, cfg, micro, dpo, mesh, ref_params=ref_params, frozen=frozen, lora=lora,
                               rng=micro_rng)

    total, sums, grads = accumulate(sums_fn, state.params, batch, accum_steps, rng)
    state, grad_norm = apply_gradients(state, grads, optimizer)
    return state, {**pair_means(total, sums), "grad_norm": grad_norm}
