"""Hugging Face PEFT LoRA adapters <-> phi3jax adapters.

    lora_to_peft("runs/sft", "adapter/")        # peft.PeftModel.from_pretrained(base, "adapter/") loads it
    peft_to_lora("Phi-3-mini", "adapter/", "runs/imported")   # a LoRA run dir: generate, merge, train on

PEFT stores, per targeted module, lora_A.weight [r, in] and lora_B.weight [out, r] (torch Linear
layout) under `base_model.model.model.layers.<i>.<module>.`, and adapter_config.json with `r`,
`lora_alpha` (scale alpha / r) and `target_modules`. Phi-3's fused modules map one to one onto
ours: qkv_proj's one A is our shared `qkv_a`, its B rows are q, k, v stacked as in the base weight.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from phi3jax import lora as lora_lib
from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.convert.files import atomic_directory, write_json
from phi3jax.convert.safetensors import CheckpointError, SafetensorsWriter
from phi3jax.model import Params
from phi3jax.train import checkpoint as ckpt

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
           "down": "mlp.down_proj"}
PREFIX = "base_model.model.model.layers.{l}."


def _by_target(cfg: Phi3Config) -> dict[str, list[lora_lib.Projection]]:
    out: dict[str, list[lora_lib.Projection]] = {}
    for proj in lora_lib.projections(cfg):
        out.setdefault(proj.target, []).append(proj)
    return out


def peft_tensors(adapters: Params, cfg: Phi3Config, lora: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors (float32) of stacked adapters."""
    r = lora.rank
    out = {}
    for layer in range(cfg.num_hidden_layers):
        one = {k: np.asarray(v[layer], np.float32) for k, v in _flat(adapters["layers"]).items()}
        for target, projs in _by_target(cfg).items():
            if target not in lora.targets:
                continue
            name = PREFIX.format(l=layer) + MODULES[target]
            a = one[projs[0].a]  # [*in, r]
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
            b = np.concatenate([one[p.b].reshape(r, -1) for p in projs], axis=1)  # [r, out]
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def _flat(tree: Params, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def adapter_config(cfg: Phi3Config, lora: LoraConfig, base_model: str | None) -> dict[str, Any]:
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": alpha, "lora_dropout": lora.dropout,
            "target_modules": [MODULES[t].split(".")[-1] for t in lora.targets], "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}}


def write_peft(adapters: Params, cfg: Phi3Config, lora: LoraConfig, out: str | os.PathLike,
               base_model: str | None = None, force: bool = False) -> str:
    """An adapter directory PEFT loads (adapter_config.json + adapter_model.safetensors), built under a
    temporary name and renamed into place when complete."""
    tensors = peft_tensors(adapters, cfg, lora)
    with atomic_directory(out, overwrite=force) as tmp:
        write_json(os.path.join(tmp, ADAPTER_CONFIG), adapter_config(cfg, lora, base_model))
        specs = [(name, np.dtype(np.float32), arr.shape) for name, arr in tensors.items()]
        with SafetensorsWriter(os.path.join(tmp, ADAPTER_WEIGHTS), specs) as writer:
            for name, arr in tensors.items():
                writer.write(name, arr)
    return os.path.abspath(os.fspath(out))


def lora_to_peft(ckpt_path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    """Export a LoRA run's adapters (latest step, or the given step directory) as a PEFT adapter."""
    from phi3jax.convert.lora import open_base, restore_adapters, run_lora

    run_dir, step = ckpt.resolve_checkpoint(ckpt_path)
    info = run_lora(run_dir)
    if info is None:
        raise ckpt.RunDirError(f"{run_dir} is not a LoRA run (no lora: section in its config.yaml); only LoRA "
                               "runs have adapters to export")
    lora, init_from = info
    cfg = ckpt.model_config(run_dir)
    source, _ = open_base(init_from)
    base_model = getattr(source, "directory", None) or getattr(source, "run_dir", None)
    adapters = restore_adapters(run_dir, step, cfg, lora)
    return write_peft(adapters, cfg, lora, out, base_model=os.path.abspath(base_model) if base_model else None,
                      force=force)


# ---------------------------------------------------------------------------- import
def read_peft(adapter_dir: str | os.PathLike, cfg: Phi3Config) -> tuple[LoraConfig, Params]:
    """(LoRA settings, stacked float32 adapters) of a PEFT LoRA adapter for a model of `cfg`; anything
    phi3jax's LoRA cannot express exactly is an error naming the setting."""
    from phi3jax.convert.safetensors import SafetensorsReader

    adapter_dir = os.fspath(adapter_dir)
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_CONFIG}; pass a PEFT adapter directory")
    with open(path, encoding="utf-8") as f:
        conf = json.load(f)

    def unsupported(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {key}={conf.get(key)!r} is not supported ({why})")

    if conf.get("peft_type", "LORA") != "LORA":
        raise unsupported("peft_type", "only LoRA adapters can be imported")
    for key, ok in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False)):
        if conf.get(key, ok) != ok:
            raise unsupported(key, f"phi3jax's LoRA needs {key}={ok}")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if conf.get(key):
            raise unsupported(key, "every layer must have the same adapters and nothing else trained")
    if conf.get("bias", "none") != "none":
        raise unsupported("bias", "Phi-3's projections have no bias")
    modules = conf.get("target_modules")
    names = {MODULES[t].split(".")[-1]: t for t in MODULES}
    if isinstance(modules, str) or not modules or not set(modules) <= set(names):
        raise unsupported("target_modules", f"name a subset of {sorted(names)} as a list")
    lora = LoraConfig(rank=int(conf["r"]), alpha=float(conf["lora_alpha"]), dropout=float(conf.get("lora_dropout", 0)),
                      targets=tuple(t for t in MODULES if MODULES[t].split(".")[-1] in modules))
    reader = SafetensorsReader(adapter_dir, ADAPTER_WEIGHTS)
    available = reader.names()
    r = lora.rank
    abstract = lora_lib.abstract_adapters(cfg, lora)
    flat = {path: np.zeros(leaf.shape, np.float32) for path, leaf in _flat(abstract["layers"]).items()}
    used = set()
    for layer in range(cfg.num_hidden_layers):
        for target, projs in _by_target(cfg).items():
            if target not in lora.targets:
                continue
            stem = PREFIX.format(l=layer) + MODULES[target]
            arrays = {}
            for part in ("lora_A", "lora_B"):
                name = next((n for n in (f"{stem}.{part}.weight", f"{stem}.{part}.default.weight") if n in available),
                            None)
                if name is None:
                    raise CheckpointError(f"{adapter_dir}: tensor {stem}.{part}.weight is missing")
                arrays[part] = np.asarray(reader.get(name), np.float32)
                used.add(name)
            a_shape = flat[projs[0].a].shape[1:]
            want_a = (r, int(np.prod(a_shape[:-1])))
            want_b = (sum(int(np.prod(flat[p.b].shape[2:])) for p in projs), r)
            for part, want in (("lora_A", want_a), ("lora_B", want_b)):
                if arrays[part].shape != want:
                    raise CheckpointError(f"{adapter_dir}: {stem}.{part}.weight has shape {list(arrays[part].shape)}, "
                                          f"expected {list(want)} for this model and r={r}")
            flat[projs[0].a][layer] = arrays["lora_A"].T.reshape(a_shape)
            start = 0
            for p in projs:
                width = int(np.prod(flat[p.b].shape[2:]))
                flat[p.b][layer] = arrays["lora_B"][start:start + width].T.reshape(flat[p.b].shape[1:])
                start += width
    extra = sorted(available - used)
    if extra:
        raise CheckpointError(f"{adapter_dir}: tensor {extra[0]} ({len(extra)} in all) belongs to no module "
                              "phi3jax adapts; is this an adapter for a Phi-3 model?")
    adapters: Params = {}
    for path, value in flat.items():
        lora_lib.set_leaf(adapters, f"layers/{path}", value)
    return lora, adapters


def peft_to_lora(hf_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike,
                 force: bool = False) -> str:
    """A LoRA run directory (config.yaml with lora: and init_from: hf:HF_DIR, the tokenizer, the
    adapters at step 0) from a PEFT adapter: generate/chat/eval/merge take it, and training with
    init_from=ckpt:OUT continues from its adapters."""
    from phi3jax.convert.hf import HFSource

    source = HFSource(hf_dir)  # validates the base
    lora, adapters = read_peft(adapter_dir, source.cfg)
    with atomic_directory(out, overwrite=force) as tmp:
        ckpt.write_yaml(os.path.join(tmp, ckpt.CONFIG_FILE), {
            "model": ckpt.model_fields(source.cfg), "lora": lora_lib.config_fields(lora),
            "init_from": f"hf:{os.path.abspath(source.directory)}"})
        ckpt.copy_tokenizer_files(source.directory, tmp)
        ckpt.save_params(tmp, 0, adapters, source.cfg)
    return os.path.abspath(os.fspath(out))
