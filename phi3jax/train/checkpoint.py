"""Run directories: the unit every command shares.

    run_dir/config.yaml          the resolved config; its `model:` section holds every Phi3Config field
    run_dir/tokenizer.model      SentencePiece model (chat tokens as user-defined pieces or Phi-3's)
    run_dir/tokenizer_config.json  optional: added tokens + chat template (HF-converted runs)
    run_dir/checkpoints/<step>/  orbax: items `params`, `opt_state`, `data_iter`, `meta`

`--ckpt` anywhere takes a run directory (its latest step) or a step directory (that step).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from phi3jax.config import Phi3Config
from phi3jax.model import Params, abstract_params

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
ITEMS = ("params", "opt_state", "data_iter", "meta")
# Tokenizer files a run directory keeps from its source (a SentencePiece model, HF's files).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json")


class RunDirError(ValueError):
    """A path that is not a usable run or step directory."""


def model_fields(cfg: Phi3Config) -> dict[str, Any]:
    """Every Phi3Config field as plain YAML-friendly values."""
    out = dataclasses.asdict(cfg)
    for key, value in out.items():
        if isinstance(value, tuple):
            out[key] = list(value)
    return out


def write_yaml(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)


def read_run_config(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"{run_dir} has no {CONFIG_FILE}; is it a run directory written by train.py "
                          "or `phi3jax convert hf-to-orbax`?")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data.get("model"), dict):
        raise RunDirError(f"{path} has no `model:` section")
    return data


def copy_tokenizer_files(source: str, run_dir: str) -> list[str]:
    """Copy the tokenizer of `source` (a directory, or a tokenizer.model file) into `run_dir`."""
    if not os.path.isdir(source):
        shutil.copyfile(source, os.path.join(run_dir, TOKENIZER_FILE))
        copied = [TOKENIZER_FILE]
        source = os.path.dirname(source)
        names = [n for n in TOKENIZER_FILES if n != TOKENIZER_FILE]
    else:
        copied, names = [], list(TOKENIZER_FILES)
    for name in names:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(run_dir, name))
            copied.append(name)
    return copied


def model_config(run_dir: str, **overrides: Any) -> Phi3Config:
    fields = dict(read_run_config(run_dir)["model"])
    fields.pop("preset", None)
    return Phi3Config(**{**fields, **overrides})


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, int]:
    """(run_dir, step) for a run directory (latest step) or a step directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CHECKPOINTS and re.fullmatch(r"\d+", os.path.basename(path)):
        return os.path.dirname(parent), int(os.path.basename(path))
    steps = list_steps(path)
    if not steps:
        raise RunDirError(f"{path} holds no finished checkpoint (expected {CHECKPOINTS}/<step>/ inside a run "
                          "directory, or a step directory itself)")
    return path, steps[-1]


def list_steps(run_dir: str) -> list[int]:
    """Finished checkpoint steps, oldest first (orbax's unfinished temporaries are ignored)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return sorted(int(name) for name in os.listdir(root)
                  if re.fullmatch(r"\d+", name) and os.path.isdir(os.path.join(root, name)))


def checkpoint_manager(run_dir: str, max_to_keep: int | None = None, async_save: bool = True
                       ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), CHECKPOINTS), options=options,
                                 item_names=ITEMS)


def save_params(run_dir: str, step: int, params: Params, cfg: Phi3Config) -> None:
    """A params-only checkpoint (what `convert hf-to-orbax` writes; train.py can start from it)."""
    with checkpoint_manager(run_dir, async_save=False) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()


def restore_params(run_dir: str, step: int, cfg: Phi3Config, shardings: Any = None, abstract: Any = None
                   ) -> Params:
    """Params of a checkpoint step, cast to cfg.param_dtype, placed per `shardings` if given
    (else on this process's first device, whatever topology saved them: a pod's checkpoint
    loads on a laptop). `abstract`: the tree to restore (default: the model's parameters; a LoRA
    run passes its adapters')."""
    abstract = abstract_params(cfg) if abstract is None else abstract
    if shardings is None:
        device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with checkpoint_manager(run_dir, async_save=False) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    return restored["params"]


def save_train_state(manager: ocp.CheckpointManager, step: int, params: Params, opt_state: Any,
                     data_state: dict[str, Any], meta: dict[str, Any], force: bool = False) -> bool:
    """Start saving a full training checkpoint (async if the manager is): params, optimiser state,
    the global data position (`data_state`, JSON: every row stream's, the same on every process)
    and `meta` (step, RNG, counters)."""
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                              data_iter=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))
    return manager.save(step, args=args, force=force)


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_params: Params,
                        abstract_opt_state: Any, data_iter: Any = None) -> tuple[Params, Any, dict[str, Any]]:
    """(params, opt_state, meta) of a training checkpoint, each array read onto the devices its
    abstract value's sharding names (any mesh, whichever mesh saved it); `data_iter`, if given,
    is moved to the saved global data position (whichever number of processes saved it)."""
    step_dir = os.path.join(os.fspath(manager.directory), str(step))
    needed = ("opt_state",) + (("data_iter", "meta") if data_iter is not None else ())
    missing = [item for item in needed if not os.path.isdir(os.path.join(step_dir, item))]
    if missing:
        raise RunDirError(f"checkpoint step {step} in {manager.directory} has no {missing}: it is a "
                          "params-only checkpoint; start from it with init_from=ckpt:<dir> in a new run_dir")
    if data_iter is not None and any(n.startswith("process_") for n in os.listdir(os.path.join(step_dir, "data_iter"))):
        raise RunDirError(f"checkpoint step {step} in {manager.directory} holds a per-process data position "
                          "written by an earlier phi3jax, which this version cannot continue; start a new run "
                          f"from its weights with init_from=ckpt:{step_dir} and a new run_dir")
    items = dict(params=ocp.args.StandardRestore(abstract_params),
                 opt_state=ocp.args.StandardRestore(abstract_opt_state))
    if data_iter is not None:
        items.update(data_iter=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
        data_iter.set_state(restored["data_iter"])
    return restored["params"], restored["opt_state"], dict(restored.get("meta") or {})


def load_run(path: str | os.PathLike, dtype: str | None = None) -> tuple[Phi3Config, Params, Any]:
    """(config, params, tokenizer) of a run directory's latest step or of a step directory."""
    from phi3jax.tokenizer import Tokenizer

    run_dir, step = resolve_checkpoint(path)
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    cfg = model_config(run_dir, **overrides)
    params = restore_params(run_dir, step, cfg)
    return cfg, params, Tokenizer.load(run_dir)
