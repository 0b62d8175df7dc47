"""The training loop behind `train.py`: config -> data -> model -> steps -> checkpoints -> report.

    result = train(load_config("configs/tiny.yaml", ["steps=50"]))

A run directory that already holds checkpoints is resumed: parameters, optimiser state, step,
RNG and the data iterator's position are restored, so the resumed run logs the same losses, bit
for bit, as one that never stopped, on any number of processes (the data order is global).
SIGTERM (a TPU preemption notice) and Ctrl-C save and exit cleanly. One training owns a run
directory at a time, and a resume that would change the run is refused (`phi3jax.train.rundir`).

Scale-out: the mesh comes from the `mesh:` section (`phi3jax.parallel`; docs/scaling.md). The
state is created, loaded or restored directly in its sharded layout, every step and evaluation
runs over the mesh, and each process feeds only its own rows of the global batch.

LoRA (`lora:` section): the `init_from` model is the frozen base, loaded (and quantized, for
QLoRA) one layer at a time straight into its sharded layout; only the adapters are trained, held
in the optimiser and saved. A resumed LoRA run loads its base again from `init_from`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phi3jax import lora as lora_lib
from phi3jax import parallel
from phi3jax.config import RUNTIME_FIELDS, LoraConfig, Phi3Config
from phi3jax.inference.generate import generate, stop_tokens
from phi3jax.model import abstract_params, param_shardings
from phi3jax.tokenizer import Tokenizer
from phi3jax.train import baselines, preference, rundir
from phi3jax.train import checkpoint as ckpt
from phi3jax.train import data as data_lib
from phi3jax.train import dpo as dpo_lib
from phi3jax.train import metrics as metrics_lib
from phi3jax.train import state as state_lib
from phi3jax.train.config import TrainConfig, TrainConfigError, build_model_config, model_section
from phi3jax.train.step import TrainState, learning_rate_schedule, make_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    step: int
    status: str  # "completed" | "preempted" (SIGTERM) | "interrupted" (Ctrl-C)
    val_loss: float | None = None
    baselines: dict[str, float] = dataclasses.field(default_factory=dict)
    sample: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class Run:
    """Everything one training run holds between its set-up and its end."""

    cfg: TrainConfig
    run_dir: str
    resuming: bool
    mesh: Any
    model_cfg: Phi3Config
    tokenizer: Tokenizer
    data_iter: Any
    val_batches: list[dict[str, np.ndarray]]
    manager: Any  # orbax CheckpointManager
    state: TrainState
    step_fn: Any
    eval_fn: Any
    rng: jax.Array
    base_rng: jax.Array
    tokens_seen: int
    start_step: int
    baselines: dict[str, float]
    logger: metrics_lib.MetricsLogger
    frozen: Any = None  # LoRA: the frozen base the adapters (state.params) modify
    ref_tables: dict[str, np.ndarray] | None = None  # DPO, precomputed reference: {split: [records, 2]}
    lock: rundir.RunLock | None = None  # process 0's hold on the run directory

    @property
    def primary(self) -> bool:
        return jax.process_index() == 0

    def put_batch(self, local: dict[str, np.ndarray], split: str = "train") -> dict[str, jax.Array]:
        if preference.INDEX_KEY in local:  # preference pairs: the precomputed reference goes in, the index stays
            local = preference.with_reference(local, self.ref_tables[split] if self.ref_tables else None)
        return parallel.put_batch(local, self.mesh, self.cfg.batch_size)

    def evaluate(self) -> dict[str, float] | None:
        """The validation metrics (language modelling: loss, ppl, tokens; DPO: the loss and TRL's
        reward metrics, means over the pairs, and pairs), or None without a validation split."""
        total, sums = 0.0, {}
        for batch in self.val_batches:
            t, c = self.eval_fn(self.state.params, self.put_batch(batch, "val"))  # LoRA: the base is bound in
            total += float(t)
            for key, value in (c.items() if isinstance(c, dict) else [("count", c)]):
                sums[key] = sums.get(key, 0.0) + float(value)
        if not sums.get("count"):
            return None
        if self.cfg.objective == "dpo":
            return {key: float(value) for key, value in dpo_lib.pair_means(total, sums).items()}
        loss = total / sums["count"]
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": sums["count"]}

    def save(self, step: int, force: bool = False) -> None:
        key_data = np.asarray(jax.random.key_data(self.rng)).tolist()
        data_state = data_lib.merge_states(parallel.gather_json(self.data_iter.get_state()))  # every row's
        ckpt.save_train_state(self.manager, step, self.state.params, self.state.opt_state, data_state,
                              {"step": step, "rng": key_data, "tokens_seen": self.tokens_seen,
                               "process_count": jax.process_count()}, force=force)


# ----------------------------------------------------------------------------- set-up
def _mesh_for(cfg: TrainConfig) -> Any:
    """The device mesh of the `mesh:` section, checked against the batch and the processes."""
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_fits_mesh(cfg.batch_size, cfg.seq_len, mesh)
    rows = parallel.process_batch_rows(mesh, cfg.batch_size)
    if len(rows) * jax.process_count() != cfg.batch_size:
        raise TrainConfigError(
            f"mesh {parallel.describe_mesh(mesh)}: each process must hold its own share of the batch, "
            f"but this one's devices hold {len(rows)} of {cfg.batch_size} rows; keep mesh.tensor x "
            "mesh.sequence within one host's devices so the batch axes (data, fsdp) span the hosts")
    return mesh


def _doc_text(doc: Any) -> str:
    return doc if isinstance(doc, str) else "\n".join(m["content"] for m in doc)


def _check_model_overrides(cfg: TrainConfig, base: Phi3Config, where: str) -> Phi3Config:
    """`base` with the model section's runtime fields; an architecture field that differs is an error."""
    _, fields = model_section(cfg)
    for key, value in fields.items():
        changed = getattr(build_model_config(None, {key: value}, base), key) != getattr(base, key)
        if key not in RUNTIME_FIELDS and changed:
            raise TrainConfigError(f"model.{key}={value!r} differs from {where} ({getattr(base, key)!r}); the "
                                   f"architecture comes from there, only {RUNTIME_FIELDS} can be changed")
    return build_model_config(None, {k: v for k, v in fields.items() if k in RUNTIME_FIELDS}, base)


def _load_init_source(spec: str, param_dtype: str | None, mesh: Any) -> tuple[Phi3Config, Any, str]:
    """(config, params, tokenizer location) of init_from=hf:DIR | ckpt:PATH, each device's shards
    read straight onto it (a LoRA run: its base with the adapters merged in)."""
    from phi3jax.convert.lora import load_lora_run, run_lora

    kind, _, where = spec.partition(":")
    if kind == "hf":
        from phi3jax.convert.hf import load_hf

        cfg, params = load_hf(where, dtype=param_dtype, mesh=mesh)
        return cfg, params, where
    run_dir, step = ckpt.resolve_checkpoint(where)
    if run_lora(run_dir) is not None:
        cfg, params, _ = load_lora_run(where, dtype=param_dtype)
        return cfg, jax.device_put(params, param_shardings(cfg, mesh)), run_dir
    cfg = ckpt.model_config(run_dir)
    if param_dtype:
        cfg = cfg.replace(param_dtype=param_dtype)
    return cfg, ckpt.restore_params(run_dir, step, cfg, shardings=param_shardings(cfg, mesh)), run_dir


def _load_lora_base(cfg: TrainConfig, lora: LoraConfig, run_dir: str, resuming: bool, mesh: Any
                    ) -> tuple[Phi3Config, Tokenizer, Any, Any]:
    """(model config, tokenizer, frozen base, the init_from LoRA run's adapters or None) of a LoRA run."""
    from phi3jax.convert.lora import check_same_model, load_base, open_base, restore_adapters, run_lora

    _, fields = model_section(cfg)
    source, start = open_base(cfg.init_from)
    base_cfg, frozen = load_base(source, lora, mesh, param_dtype=fields.get("param_dtype"))
    tok_source = start[0] if start else getattr(source, "directory", None) or source.run_dir
    if resuming:
        saved = run_lora(run_dir)
        if saved is None or saved[0] != lora:
            raise TrainConfigError(f"lora={lora} differs from the run being resumed ({run_dir}: "
                                   f"{saved[0] if saved else 'not a LoRA run'}); resume with the same lora settings")
        check_same_model(ckpt.model_config(run_dir), base_cfg, run_dir)
        model_cfg = _check_model_overrides(cfg, base_cfg, f"the base ({cfg.init_from})")
        tokenizer = Tokenizer.load(run_dir)
    else:
        if jax.process_index() == 0:
            ckpt.copy_tokenizer_files(tok_source, run_dir)
        model_cfg, tokenizer = _check_model_overrides(cfg, base_cfg, cfg.init_from), Tokenizer.load(tok_source)
    adapters = None
    reference_needs_start = (cfg.objective == "dpo" and cfg.dpo.uses_reference and cfg.dpo.reference != "adapter_off")
    if start is not None and (not resuming or reference_needs_start):
        parent, _ = run_lora(start[0])
        if (parent.rank, parent.targets) != (lora.rank, lora.targets):
            raise TrainConfigError(f"init_from={cfg.init_from} has adapters of rank {parent.rank} on {parent.targets}; "
                                   f"lora.rank and lora.targets must match them to continue training")
        adapters = restore_adapters(start[0], start[1], model_cfg, lora,
                                    lora_lib.adapter_shardings(model_cfg, lora, mesh))
    return model_cfg, tokenizer, frozen, adapters


def _resolve_model(cfg: TrainConfig, run_dir: str, resuming: bool, train_texts: Callable[[], Any], mesh: Any
                   ) -> tuple[Phi3Config, Tokenizer, Any]:
    """(model config, tokenizer, initial params or None) for a new or resumed run."""
    primary = jax.process_index() == 0
    preset, fields = model_section(cfg)
    if resuming:
        saved = ckpt.model_config(run_dir)
        return _check_model_overrides(cfg, saved, f"the run being resumed ({run_dir})"), Tokenizer.load(run_dir), None
    if cfg.init_from is not None:
        source_cfg, params, tok_source = _load_init_source(cfg.init_from, fields.get("param_dtype"), mesh)
        if primary:
            ckpt.copy_tokenizer_files(tok_source, run_dir)
        return _check_model_overrides(cfg, source_cfg, cfg.init_from), Tokenizer.load(tok_source), params
    tok_path = os.path.join(run_dir, ckpt.TOKENIZER_FILE)
    if cfg.data.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
        if primary:
            ckpt.copy_tokenizer_files(cfg.data.tokenizer, run_dir)
    elif os.path.isfile(tok_path):  # a run that stopped before its first checkpoint
        tokenizer = Tokenizer.load(run_dir)
    else:
        target = tok_path if primary else os.path.join(run_dir, f".tokenizer.{os.getpid()}.model")
        tokenizer = data_lib.train_sentencepiece(train_texts(), cfg.data.vocab_size, target)
    derived = {"bos_token_id": tokenizer.bos_id, "eos_token_id": (tokenizer.eos_id,), "pad_token_id": tokenizer.pad_id}
    if "vocab_size" not in fields:
        derived["vocab_size"] = tokenizer.vocab_size
    model_cfg = build_model_config(preset, {**derived, **fields})
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise TrainConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                               f"{tokenizer.vocab_size} tokens; drop model.vocab_size to follow the tokenizer")
    return model_cfg, tokenizer, None


def resolved_config(cfg: TrainConfig, model_cfg: Phi3Config, run_dir: str | None = None) -> dict[str, Any]:
    out = cfg.to_dict()
    out["run_dir"] = run_dir or os.path.abspath(cfg.resolved_run_dir)
    preset, _ = model_section(cfg)
    out["model"] = {"preset": preset, **ckpt.model_fields(model_cfg)}
    if cfg.init_from:  # absolute, so a LoRA run finds its base from anywhere
        kind, _, where = cfg.init_from.partition(":")
        out["init_from"] = f"{kind}:{os.path.abspath(where)}"
    if cfg.lora is None:
        out.pop("lora", None)
    if cfg.objective != "dpo":
        out.pop("dpo", None)
    return out


def setup(cfg: TrainConfig) -> Run:
    """Data, tokenizer, model and train state of a new or resumed run, placed on its mesh, with the run
    directory locked (`rundir`; `Run.release` frees it). A run directory this call created is removed
    again if the set-up fails."""
    parallel.initialize_distributed(cfg.distributed)
    process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.batch_size % process_count:
        raise TrainConfigError(f"batch_size={cfg.batch_size} must be divisible by the {process_count} processes")
    run_dir = os.path.abspath(cfg.resolved_run_dir)
    created = not os.path.exists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    lock, busy = None, None
    if process_index == 0:
        try:
            lock = rundir.RunLock.acquire(run_dir)
        except rundir.RunDirBusy as e:
            busy = e
    if not parallel.broadcast_flag(busy is None):  # one lock per run, honoured by every process
        raise busy or rundir.RunDirBusy(f"run_dir {run_dir} is in use by another training (see process 0)")
    try:
        run = _setup(cfg, run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and process_index == 0 and not ckpt.list_steps(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    run.lock = lock
    return run


def _data_identity(cfg: TrainConfig, train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    d = cfg.data
    sources: dict[str, list[dict[str, Any]]] = {}
    for name, path in (("train", d.path), ("val", d.val_path)):
        if path is not None:
            sources[name] = [rundir.file_identity(f) for f in data_lib.resolve_paths(path)]
        elif name == "train":
            sources[name] = [data_lib.default_corpus_identity()]
    return rundir.data_identity(sources, train_idx, val_idx)


def _setup(cfg: TrainConfig, run_dir: str) -> Run:
    process_index = jax.process_index()
    steps = ckpt.list_steps(run_dir)
    resuming = bool(steps)
    if resuming and not os.path.isdir(os.path.join(run_dir, ckpt.CHECKPOINTS, str(steps[-1]), "opt_state")):
        raise TrainConfigError(f"run_dir={run_dir} holds a params-only checkpoint (a converted model); train from "
                               f"it with init_from=ckpt:{run_dir} and a new run_dir")

    d = cfg.data
    dpo = cfg.dpo if cfg.objective == "dpo" else None
    read = preference.read_records if dpo else (
        lambda path: data_lib.read_documents(path, d.format, d.text_key, d.doc_separator))
    docs = read(d.path)
    if d.val_path is not None:
        val_docs = read(d.val_path)
        train_idx, val_idx = np.arange(len(docs)), np.arange(len(val_docs))
    else:
        sized = [json.dumps(r) for _, r in docs] if dpo else docs  # records are held out by their size
        train_idx, val_idx = data_lib.split_train_val(sized, d.val_fraction, cfg.data_seed)
        val_docs = docs
    identity = _data_identity(cfg, train_idx, val_idx)
    if resuming:  # a resume continues the saved run: anything that changes the run needs resume.allow_changes
        saved_model = _check_model_overrides(cfg, ckpt.model_config(run_dir), f"the run being resumed ({run_dir})")
        saved_data = rundir.read_data_identity(run_dir)
        changes = rundir.config_changes(ckpt.read_run_config(run_dir), resolved_config(cfg, saved_model, run_dir))
        changes += rundir.data_changes(saved_data, identity) if saved_data is not None else []
        accepted = rundir.check_resume(run_dir, changes, cfg.resume.allow_changes)
        if accepted and process_index == 0:
            print(accepted, flush=True)
    mesh = _mesh_for(cfg)
    lora, frozen, adapters = cfg.lora, None, None
    if lora is not None:
        model_cfg, tokenizer, frozen, adapters = _load_lora_base(cfg, lora, run_dir, resuming, mesh)
        init = None
    else:
        model_cfg, tokenizer, init = _resolve_model(cfg, run_dir, resuming,
                                                    lambda: (_doc_text(docs[int(i)]) for i in train_idx), mesh)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                               f"{model_cfg.vocab_size}; use the model's own tokenizer")
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise TrainConfigError(f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
                               f"{model_cfg.max_position_embeddings}; lower seq_len")
    if process_index == 0:
        ckpt.write_yaml(os.path.join(run_dir, ckpt.CONFIG_FILE), resolved_config(cfg, model_cfg, run_dir))
        rundir.write_data_identity(run_dir, identity)

    rows = parallel.process_batch_rows(mesh, cfg.batch_size)  # this process's rows of every global batch
    if dpo is None:
        split_documents = d.split_documents if d.split_documents is not None else d.format != "chat"
        common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rows=rows, split_documents=split_documents,
                      add_bos=d.add_bos, add_eos=d.add_eos)
        data_iter = iter(data_lib.train_batches(docs, train_idx, tokenizer, seed=cfg.data_seed, shuffle=d.shuffle,
                                                **common))
        val_batches = data_lib.eval_batches(val_docs, val_idx, tokenizer, max_batches=cfg.log.eval_batches,
                                            **common)
    else:
        train_pairs, val_pairs = (_tokenize_pairs(cfg, [records[int(i)] for i in idx], tokenizer)
                                  for records, idx in ((docs, train_idx), (val_docs, val_idx)))
        common = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rows=rows)
        data_iter = iter(preference.train_batches(train_pairs.pairs, seed=cfg.data_seed, shuffle=d.shuffle,
                                                  **common))
        val_batches = preference.eval_batches(val_pairs.pairs, **common)
        if cfg.log.eval_batches:
            val_batches = val_batches[: cfg.log.eval_batches]

    optimizer = make_optimizer(cfg.optim, cfg.steps)
    shardings = state_lib.state_shardings(model_cfg, mesh, optimizer, lora)
    manager = ckpt.checkpoint_manager(run_dir, max_to_keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
    base_rng = jax.random.key(cfg.seed)
    meta: dict[str, Any] = {}
    if resuming:  # onto this run's mesh, whichever mesh saved it
        abstract = state_lib.abstract_state(model_cfg, mesh, optimizer, lora)
        params, opt_state, meta = ckpt.restore_train_state(manager, manager.latest_step(), abstract.params,
                                                           abstract.opt_state, data_iter)
    elif lora is not None:  # adapters only: fresh (B = 0) or those of the init_from LoRA run
        fresh = state_lib.sharded_lora_init(model_cfg, lora, mesh, optimizer, base_rng, adapters)
        params, opt_state = fresh.params, fresh.opt_state
    elif init is not None:
        params = jax.tree.map(lambda x: x.astype(model_cfg.param_dtype), init)
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    else:  # created sharded: no device ever holds the whole model
        fresh = state_lib.sharded_init(model_cfg, mesh, optimizer, base_rng)
        params, opt_state = fresh.params, fresh.opt_state
    start_step = int(meta.get("step", 0))
    rng = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32)) if "rng" in meta else base_rng
    logger = metrics_lib.MetricsLogger(run_dir, total_steps=cfg.steps, start_step=start_step,
                                       primary=process_index == 0, tensorboard=cfg.log.tensorboard,
                                       progress_bar=cfg.log.progress_bar)
    if dpo is not None:
        def start() -> Any:  # the starting weights (init_from; with LoRA the starting adapters on the base)
            if lora is not None:
                return adapters if adapters is not None else state_lib.sharded_lora_init(
                    model_cfg, lora, mesh, optimizer, base_rng).params
            return _resolve_model(cfg, run_dir, False, lambda: (), mesh)[2] if resuming else params

        ref_params, tables = _reference(cfg, model_cfg, mesh, run_dir, start, frozen,
                                        {"train": train_pairs, "val": val_pairs})
        dpo_step = state_lib.make_dpo_step(model_cfg, mesh, optimizer, dpo, accum_steps=cfg.optim.accum_steps,
                                           lora=lora, seed=cfg.seed)
        dpo_eval = state_lib.make_dpo_eval_step(model_cfg, mesh, dpo, lora)
        step_fn = lambda state, batch: dpo_step(state, batch, frozen, ref_params)  # noqa: E731
        eval_fn = lambda params, batch: dpo_eval(params, batch, frozen, ref_params)  # noqa: E731
        base = {}
    else:
        base = _baselines(cfg, docs, train_idx, val_batches, tokenizer, model_cfg) if process_index == 0 else {}
        step_fn = state_lib.make_train_step(model_cfg, mesh, optimizer, accum_steps=cfg.optim.accum_steps,
                                            lora=lora, seed=cfg.seed)
        eval_fn = state_lib.make_eval_step(model_cfg, mesh, lora)
        if lora is not None:  # the frozen base is an argument of every step, bound here
            lora_step, lora_eval = step_fn, eval_fn
            step_fn = lambda state, batch: lora_step(state, batch, frozen)  # noqa: E731
            eval_fn = lambda adapters, batch: lora_eval(adapters, batch, frozen)  # noqa: E731
    return Run(cfg=cfg, run_dir=run_dir, resuming=resuming, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer,
               data_iter=data_iter, val_batches=val_batches, manager=manager,
               state=state_lib.state_at_step(params, opt_state, start_step, mesh), step_fn=step_fn, eval_fn=eval_fn,
               rng=rng, base_rng=base_rng, tokens_seen=int(meta.get("tokens_seen", 0)), start_step=start_step,
               baselines=base, logger=logger, frozen=frozen, ref_tables=tables if dpo is not None else None)


def _tokenize_pairs(cfg: TrainConfig, records: list[tuple[str, Any]], tokenizer: Tokenizer
                    ) -> preference.PreferenceData:
    limit = cfg.dpo.length_limit(cfg.seq_len)
    data = preference.tokenize_records(records, tokenizer, max_length=limit,
                                       max_prompt_length=cfg.dpo.max_prompt_length,
                                       truncation_mode=cfg.dpo.truncation_mode, add_bos=cfg.data.add_bos)
    if records and jax.process_index() == 0 and (data.truncated or data.dropped):
        print(f"preference data: {data.describe(limit)}", flush=True)
    return data


def _reference(cfg: TrainConfig, model_cfg: Phi3Config, mesh: Any, run_dir: str, start: Callable[[], Any],
               frozen: Any, splits: dict[str, preference.PreferenceData]) -> tuple[Any, dict[str, np.ndarray] | None]:
    """(the `ref_params` of every DPO step, the precomputed tables {split: [records, 2]}), each None
    where the reference option has none (`phi3jax.train.dpo`)."""
    dpo, lora = cfg.dpo, cfg.lora
    if not dpo.uses_reference or dpo.reference == "adapter_off":
        return None, None
    if dpo.reference == "frozen":  # a copy: the state's own parameters are donated to each step
        return jax.tree.map(lambda x: x.copy(), start()), None
    digest = hashlib.sha256()
    for split in sorted(splits):
        for pair in splits[split].pairs:
            for ids, mask in pair.sequences():
                digest.update(ids.tobytes() + mask.tobytes())
    fingerprint = {"init_from": resolved_config(cfg, model_cfg)["init_from"], "lora": lora and dataclasses.asdict(lora),
                   "seed": cfg.seed, "pairs": digest.hexdigest()}
    tables = preference.load_reference(run_dir, fingerprint)
    if tables is not None:
        return None, tables
    weights = start()
    logps_step = state_lib.make_logps_step(model_cfg, mesh, lora)
    rows = parallel.process_batch_rows(mesh, cfg.batch_size)
    tables = {}
    for split, data in splits.items():
        table = np.zeros((len(data.pairs) and max(p.index for p in data.pairs) + 1, 2), np.float64)
        for batch in preference.eval_batches(data.pairs, seq_len=cfg.seq_len, batch_size=cfg.batch_size):
            local = {k: v[rows] for k, v in batch.items()}
            logps, _ = logps_step(weights, parallel.put_batch(preference.with_reference(local, None), mesh,
                                                              cfg.batch_size), frozen)
            preference.record_logps(np.asarray(logps), batch, len(table), out=table)
        tables[split] = table.astype(np.float32)
    if jax.process_index() == 0:
        path = preference.save_reference(run_dir, tables, fingerprint)
        print(f"reference log-probabilities of {sum(len(d.pairs) for d in splits.values())} pairs precomputed "
              f"into {path}", flush=True)
    return None, tables


# ----------------------------------------------------------------------------- the steps
class _Preemption:
    """SIGTERM (a preemption notice) or Ctrl-C (SIGINT) sets a flag; the loop saves and stops at the end of
    the current step. A second Ctrl-C exits at once, without saving."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: str | None = None  # "SIGTERM" or "SIGINT" once one arrived
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> _Preemption:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                break
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            print("\nsecond Ctrl-C: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving at the end of this step (Ctrl-C again to exit without saving)", file=sys.stderr,
                  flush=True)
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _announce(run: Run) -> None:
    cfg, model_cfg = run.cfg, run.model_cfg
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params))
    processes = jax.process_count()
    what = f"model {n_params / 1e6:.2f}M params"
    if cfg.lora is not None:
        n_base = lora_lib.count(abstract_params(model_cfg))
        what = (f"LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}: {n_params:,} trained params "
                f"({100 * n_params / n_base:.2f}% of {n_base:,}, base as {cfg.lora.base_dtype})")
    run.logger.print(
        f"run_dir {run.run_dir} | {'resuming at step ' + str(run.start_step) if run.resuming else 'new run'} | "
        f"{what}, vocab {model_cfg.vocab_size} | {cfg.batch_size} x {cfg.seq_len} tokens "
        f"per step on {jax.device_count()} {jax.devices()[0].platform} device(s), mesh "
        f"{parallel.describe_mesh(run.mesh)}" + (f", {processes} processes" if processes > 1 else ""))
    if cfg.objective == "dpo":
        ref = "none (reference-free)" if not cfg.dpo.uses_reference else cfg.dpo.reference
        run.logger.print(f"objective dpo: loss {cfg.dpo.loss}, beta {cfg.dpo.beta}, reference {ref}; "
                         f"{len(run.val_batches)} validation batches of pairs")
    if run.baselines:
        run.logger.print("baselines on the validation tokens: " +
                         ", ".join(f"{k} {v:.4f}" for k, v in run.baselines.items()))


def run_steps(run: Run, on_step: Callable[[int, Run], Any] | None = None) -> str:
    """Train from run.start_step to cfg.steps; "completed", or "preempted" / "interrupted" after the save
    that a SIGTERM / Ctrl-C asked for.

    on_step(step, run) is called after each step's logging, evaluation and checkpoint (a save may
    still be in flight): a hook for callers that watch a run.
    """
    cfg, logger = run.cfg, run.logger
    schedule = learning_rate_schedule(cfg.optim, cfg.steps)
    flops_per_token = metrics_lib.train_flops_per_token(run.model_cfg, cfg.seq_len)
    peak = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops
            else metrics_lib.device_peak_flops(dtype=run.model_cfg.dtype))
    peak_total = peak * jax.device_count() if peak else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_saved = run.start_step if run.resuming else -1
    window_time, window_steps = 0.0, 0
    with _Preemption() as preemption:
        for step in range(run.start_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            run.state, out = run.step_fn(run.state, run.put_batch(next(run.data_iter)))
            loss = float(out["loss"])
            extra = {k: float(v) for k, v in out.items() if k not in ("loss", "grad_norm", "tokens")}
            window_time += time.perf_counter() - t0
            window_steps += 1
            if not math.isfinite(loss):
                run.manager.wait_until_finished()
                good = run.manager.latest_step()
                where = (f"the last good checkpoint is step {good} in {os.path.join(run.run_dir, ckpt.CHECKPOINTS)}"
                         if good is not None else "no checkpoint was saved yet")
                raise TrainingDiverged(f"loss is {loss} at step {step}: training diverged, stopping. {where} (left "
                                       "intact; rerunning resumes from it). Lower optim.learning_rate, raise "
                                       "optim.warmup_steps or check the data.")
            run.rng = jax.random.fold_in(run.base_rng, step)
            run.tokens_seen += tokens_per_step
            logger.advance(step, loss)
            if step % cfg.log.every == 0 or step == cfg.steps:
                tps = window_steps * tokens_per_step / max(window_time, 1e-9)
                logger.log(step, "train", {
                    "loss": loss, "grad_norm": float(out["grad_norm"]), "lr": float(schedule(step - 1)),
                    "tokens": int(out["tokens"]), "tokens_per_s": round(tps, 1),
                    "mfu": round(flops_per_token * tps / peak_total, 4) if peak_total else None, **extra})
                window_time, window_steps = 0.0, 0
            if cfg.log.eval_every and step % cfg.log.eval_every == 0 and step != cfg.steps:
                result = run.evaluate()
                if result is not None:
                    logger.log(step, "val", {k: v for k, v in result.items() if k != "tokens"})
            if (step % cfg.save_every == 0 or step == cfg.steps) and step != last_saved:
                run.save(step)
                last_saved = step
            if on_step is not None:
                on_step(step, run)
            if preemption.requested:
                if step != last_saved:
                    run.save(step, force=True)
                run.manager.wait_until_finished()
                name = "Ctrl-C" if preemption.signal == "SIGINT" else preemption.signal
                logger.print(f"{name}: saved step {step} to {run.run_dir}; exiting (rerun the same command to resume)")
                return "interrupted" if preemption.signal == "SIGINT" else "preempted"
    run.manager.wait_until_finished()
    return "completed"


# ----------------------------------------------------------------------------- the end
def _finish(run: Run, status: str, seconds: float) -> TrainResult:
    cfg = run.cfg
    final_step = int(run.state.step)
    val_loss = sample = None
    if status == "completed":
        result = run.evaluate()
        if result is not None:
            val_loss = result["loss"]
            if run.primary and final_step > run.start_step:
                with open(os.path.join(run.run_dir, metrics_lib.METRICS_FILE), "a", encoding="utf-8") as f:
                    record = {k: v for k, v in result.items() if k != "tokens"}
                    f.write(json.dumps({"step": final_step, "split": "val", **record}) + "\n")
            if run.primary and cfg.objective == "dpo":
                _report_preference(result)
            elif run.primary:
                _report(val_loss, result["tokens"], run.baselines)
        if run.primary and cfg.log.plot:
            metrics_lib.plot_losses(run.run_dir)
        if cfg.log.sample_prompt and jax.process_count() > 1:
            run.logger.print("sample skipped: generating from parameters spread over several processes is not "
                             "supported; `phi3jax generate --ckpt` the run instead")
        elif cfg.log.sample_prompt and cfg.lora is not None and cfg.lora.quantized:
            run.logger.print("sample skipped: generating merges the adapters into a full-precision copy of the base; "
                             "`phi3jax generate --ckpt` the run (or `convert merge-lora`) where that fits")
        elif cfg.log.sample_prompt:
            chat = cfg.data.format in ("chat", "preference")
            params = run.state.params
            if cfg.lora is not None:
                params = lora_lib.merge(run.frozen, params, run.model_cfg, cfg.lora)
            sample = _sample(params, run.model_cfg, run.tokenizer, cfg, chat)
            if run.primary:
                shown = (f"<|user|> {cfg.log.sample_prompt}\n<|assistant|> {sample}" if chat
                         else f"{cfg.log.sample_prompt}{sample}")
                print(f"sample ({cfg.log.sample_tokens} tokens, temperature 0.8, top-k 40):\n{shown}", flush=True)
    seconds = time.perf_counter() - seconds
    if run.primary:
        print(f"{status} at step {final_step} in {seconds:.1f}s; checkpoints in "
              f"{os.path.join(run.run_dir, ckpt.CHECKPOINTS)}", flush=True)
    return TrainResult(run.run_dir, final_step, status, val_loss, run.baselines, sample, seconds)


def train(cfg: TrainConfig, on_step: Callable[[int, Run], Any] | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg` (see `run_steps` for `on_step`)."""
    start = time.perf_counter()
    run = setup(cfg)
    try:
        try:
            _announce(run)
            status = run_steps(run, on_step)
        finally:
            run.manager.close()
            run.logger.close()
        return _finish(run, status, start)
    finally:
        if run.lock is not None:
            run.lock.release()


def _baselines(cfg: TrainConfig, docs: Any, train_idx: np.ndarray, val_batches: list[dict[str, np.ndarray]],
               tokenizer: Tokenizer, model_cfg: Phi3Config) -> dict[str, float]:
    if not cfg.log.baselines or not val_batches:
        return {}
    mask = np.concatenate([b["loss_mask"].ravel() for b in val_batches]) > 0
    vx = np.concatenate([b["inputs"].ravel() for b in val_batches])[mask]
    vy = np.concatenate([b["targets"].ravel() for b in val_batches])[mask]
    tx, ty = data_lib.document_pairs(docs, train_idx, tokenizer, cfg.data.add_bos, cfg.data.add_eos)
    if not len(vy) or not len(ty):
        return {}
    v = model_cfg.vocab_size
    return {"unigram": baselines.unigram_cross_entropy(ty, vy, v),
            "bigram": baselines.bigram_cross_entropy(tx, ty, vx, vy, v)}


def _report(val_loss: float, count: float, base: dict[str, float]) -> None:
    lines = [f"validation ({int(count)} tokens, nats/token):",
             f"  model    loss {val_loss:.4f}   perplexity {math.exp(min(val_loss, 50.0)):.2f}"]
    for name, value in base.items():
        lines.append(f"  {name:<8} loss {value:.4f}   perplexity {math.exp(value):.2f}")
    if "bigram" in base:
        verdict = "below" if val_loss < base["bigram"] else "NOT below"
        lines.append(f"  the model is {verdict} the bigram baseline ({val_loss - base['bigram']:+.4f})")
    print("\n".join(lines), flush=True)


def _report_preference(result: dict[str, float]) -> None:
    lines = [f"validation ({int(result['pairs'])} preference pairs, means over pairs):",
             f"  loss {result['loss']:.4f}   " + "   ".join(f"{k} {result[k]:.4f}" for k in dpo_lib.METRICS)]
    print("\n".join(lines), flush=True)


def _sample(params: Any, model_cfg: Phi3Config, tokenizer: Tokenizer, cfg: TrainConfig, chat: bool) -> str:
    prompt = cfg.log.sample_prompt
    if chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    else:
        ids = tokenizer.encode(prompt, add_bos=True)
    room = model_cfg.max_position_embeddings - len(ids)
    if room < 1:
        return ""
    stops = stop_tokens(model_cfg, tokenizer)
    out = generate(params, model_cfg, [ids], max_new_tokens=min(cfg.log.sample_tokens, room), temperature=0.8,
                   top_k=40, seed=cfg.seed, stop_tokens=stops)
    new = [t for t in out.to_lists()[0] if t not in stops]
    # Decode with the prompt so the first new piece keeps its leading space.
    head = tokenizer.decode(ids, skip_special=True)
    return tokenizer.decode(ids + new, skip_special=True)[len(head):]
