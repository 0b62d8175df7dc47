"""Preference evaluation: a policy against a reference on held-out pairs, with TRL's DPO metrics.

    pairs = tokenize_records(read_records("prefs.jsonl"), tokenizer, max_length=1024).pairs
    policy, counts = score_pairs(params, cfg, pairs)
    reference, _ = score_pairs(ref_params, ref_cfg, pairs)
    report = preference_report(policy, reference, counts, DpoConfig(beta=0.1))

Each model is scored on its own, one after the other, so only one is ever in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from phi3jax.config import Phi3Config
from phi3jax.model import Params, param_shardings
from phi3jax.parallel import MeshConfig, make_mesh, put_batch
from phi3jax.train import preference
from phi3jax.train.dpo import METRICS, DpoConfig, preference_terms
from phi3jax.train.state import make_logps_step


def score_pairs(params: Params, cfg: Phi3Config, pairs: Sequence[preference.Pair], *, seq_len: int = 2048,
                batch_size: int = 8, progress: str | bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities [records, 2] of each pair's chosen and rejected completion, their token
    counts [records, 2]), float64 on the host; records not among `pairs` hold NaN."""
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    params = jax.device_put(params, param_shardings(cfg, mesh))
    step = make_logps_step(cfg, mesh)
    n = max(p.index for p in pairs) + 1 if pairs else 0
    logps, counts = np.full((n, 2), np.nan), np.full((n, 2), np.nan)
    batches = preference.eval_batches(pairs, seq_len=seq_len, batch_size=batch_size)
    for batch in tqdm(batches, desc=progress or None, disable=not progress, unit="batch"):
        lp, c = step(params, put_batch(preference.with_reference(batch, None), mesh), None)
        preference.record_logps(np.asarray(lp), batch, n, out=logps)
        preference.record_logps(np.asarray(c), batch, n, out=counts)
    return logps, counts


def preference_report(policy: np.ndarray, reference: np.ndarray | None, counts: np.ndarray, dpo: DpoConfig
                      ) -> dict[str, Any]:
    """TRL's loss and reward metrics (means over the pairs) and each record's numbers."""
    keep = ~np.isnan(policy).any(-1)
    ref = None if reference is None else jnp.asarray(reference[keep], jnp.float32)
    loss, metrics = preference_terms(jnp.asarray(policy[keep], jnp.float32), ref,
                                     jnp.asarray(counts[keep], jnp.float32), dpo)
    report: dict[str, Any] = {"pairs": int(keep.sum()), "loss": float(jnp.mean(loss)),
                              **{name: float(jnp.mean(metrics[name])) for name in METRICS}}
    records = []
    for i in np.flatnonzero(keep):
        row = {"index": int(i), "chosen_logps": float(policy[i, 0]), "rejected_logps": float(policy[i, 1]),
               "chosen_tokens": int(counts[i, 0]), "rejected_tokens": int(counts[i, 1])}
        if reference is not None:
            row.update(ref_chosen_logps=float(reference[i, 0]), ref_rejected_logps=float(reference[i, 1]))
        records.append(row)
    report["records"] = records
    return report
