"""LoRA runs on disk: the frozen base a run trains against, its adapters, and the merged model.

A LoRA run directory is a run directory whose config.yaml has a `lora:` section; its checkpoints
hold only the adapters (and their optimiser state), and `init_from` names the base:

    init_from: hf:DIR | ckpt:DENSE_RUN      the base, read again (and quantized again) on every load
    init_from: ckpt:LORA_RUN                continue from that run's adapters, on that run's base

    base_source, start = open_base("hf:Phi-3-mini-4k-instruct")
    cfg, base = load_base(base_source, lora, mesh)     # one layer's leaf in full precision at a time
    merge_lora("runs/sft", "out_hf")                   # streaming, W + scale * A B, one tensor at a time
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import numpy as np

from phi3jax import lora as lora_lib
from phi3jax.config import LoraConfig, Phi3Config
from phi3jax.convert.hf import HFSource, ParamSource, write_hf_directory
from phi3jax.convert.keys import Key, hf_keys
from phi3jax.convert.safetensors import CheckpointError
from phi3jax.model import Params
from phi3jax.train import checkpoint as ckpt

LORA_SECTION = "lora"


def run_lora(run_dir: str) -> tuple[LoraConfig, str] | None:
    """(LoRA settings, init_from) of a LoRA run directory; None for a plain run."""
    data = ckpt.read_run_config(run_dir)
    section = data.get(LORA_SECTION)
    if not section:
        return None
    if not data.get("init_from"):
        raise ckpt.RunDirError(f"{run_dir}/{ckpt.CONFIG_FILE} has a lora: section but no init_from naming its base")
    return LoraConfig(**section), data["init_from"]


def open_base(spec: str) -> tuple[ParamSource, tuple[str, int] | None]:
    """(the plain model a base spec names, (run_dir, step) of the adapters to start from or None).

    hf:DIR and ckpt:PLAIN_RUN are the base itself; ckpt:LORA_RUN is that run's own base (followed
    to the plain model at the root) plus its adapters.
    """
    kind, _, where = spec.partition(":")
    if kind == "hf":
        return HFSource(where), None
    if kind != "ckpt" or not where:
        raise ValueError(f"base {spec!r} must be 'hf:HF_DIR' or 'ckpt:RUN_DIR_OR_STEP_DIR'")
    run_dir, step = ckpt.resolve_checkpoint(where)
    info = run_lora(run_dir)
    if info is None:
        from phi3jax.convert.orbax import OrbaxSource

        return OrbaxSource(where), None
    source, _ = open_base(info[1])
    return source, (run_dir, step)


def _place(arr: Any, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.numpy.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: np.ascontiguousarray(arr[index]))


def load_base(source: ParamSource, lora: LoraConfig, mesh: Any = None, param_dtype: str | None = None
              ) -> tuple[Phi3Config, Params]:
    """(config, frozen base) of `source`: projections as lora.base_dtype (quantized one layer's leaf
    at a time, so the full-precision model is never in memory), the rest in `param_dtype` (default:
    the source's). Placed per the base's shardings on `mesh`, or on the default device."""
    dtype = np.dtype(param_dtype or source.dtype.name)
    cfg = source.cfg.replace(dtype=dtype.name, param_dtype=dtype.name)
    shardings = lora_lib.base_shardings(cfg, lora, mesh) if mesh is not None else None
    by_leaf = {p.leaf: p for p in lora_lib.projections(cfg)}
    base: Params = {}
    for key in hf_keys(cfg):
        path = f"layers/{key.leaf}" if key.per_layer else key.leaf
        proj = by_leaf.get(key.leaf) if key.per_layer else None
        if proj is None:
            arr = (np.stack([source.leaf(key, i) for i in range(cfg.num_hidden_layers)]) if key.per_layer
                   else source.leaf(key, None)).astype(dtype, copy=False)
            value = _place(arr, None if shardings is None else lora_lib.get(shardings, path))
        else:
            pieces = [lora_lib.quantize_leaf(source.leaf(key, i), proj, lora, stacked=False)
                      for i in range(cfg.num_hidden_layers)]
            value = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *pieces)
            sub = None if shardings is None else lora_lib.get(shardings, path)
            value = (jax.tree.map(_place, value, sub) if sub is not None
                     else jax.tree.map(lambda x: _place(x, None), value))
        lora_lib.set_leaf(base, path, value)
    return cfg, base


def restore_adapters(run_dir: str, step: int, cfg: Phi3Config, lora: LoraConfig, shardings: Any = None) -> Params:
    """The adapters of a LoRA run's checkpoint step (on `shardings`, else this process's first device)."""
    return ckpt.restore_params(run_dir, step, cfg, shardings, abstract=lora_lib.abstract_adapters(cfg, lora))


def check_same_model(cfg: Phi3Config, base_cfg: Phi3Config, where: str) -> None:
    """The run's architecture must be its base's (runtime fields may differ)."""
    from phi3jax.config import RUNTIME_FIELDS

    keep = {f: getattr(cfg, f) for f in RUNTIME_FIELDS}
    if base_cfg.replace(**keep) != cfg:
        raise CheckpointError(f"{where}: the base model's config differs from the run's config.yaml; the base "
                              "named by init_from must be the model the adapters were trained on")


def load_lora_run(path: str | os.PathLike, dtype: str | None = None, merged: bool = True
                  ) -> tuple[Phi3Config, Params, Any]:
    """(config, params, tokenizer) of a LoRA run's latest step (or a step directory): the base with
    the adapters merged in, in `dtype` (default: the base's), layers stacked."""
    from phi3jax.tokenizer import Tokenizer

    run_dir, step = ckpt.resolve_checkpoint(path)
    info = run_lora(run_dir)
    if info is None:
        raise ckpt.RunDirError(f"{run_dir} is not a LoRA run (its config.yaml has no lora: section)")
    lora, init_from = info
    source, _ = open_base(init_from)
    stored = source.dtype.name if source.dtype.name in ("bfloat16", "float32") else "float32"
    cfg, base = load_base(source, dataclasses.replace(lora, base_dtype=stored), param_dtype=stored)
    check_same_model(ckpt.model_config(run_dir), cfg, run_dir)
    adapters = restore_adapters(run_dir, step, cfg, lora)
    out_dtype = dtype or source.dtype.name
    params = lora_lib.merge(base, adapters, cfg, lora, dtype=out_dtype)
    return cfg.replace(dtype=out_dtype, param_dtype=out_dtype), params, Tokenizer.load(run_dir)


# ---------------------------------------------------------------------------- the merged model
class MergedSource(ParamSource):
    """A base model with adapters merged in, one leaf at a time (float32): what the HF and GGUF
    writers stream from."""

    def __init__(self, base: ParamSource, adapters: Params, lora: LoraConfig):
        self.base, self.lora, self.cfg = base, lora, base.cfg
        self.adapters = jax.tree.map(np.asarray, adapters)
        self.dtype = np.dtype(np.float32)
        self.description = f"{base.description} + LoRA"
        self._proj = {p.leaf: p for p in lora_lib.projections(self.cfg) if p.target in lora.targets}

    def leaf(self, key: Key, layer: int | None) -> np.ndarray:
        w = self.base.leaf(key, layer)
        proj = self._proj.get(key.leaf) if layer is not None else None
        if proj is None:
            return w
        one_layer = jax.tree.map(lambda x: x[layer], self.adapters["layers"])
        return np.asarray(w, np.float32) + np.asarray(lora_lib.delta(one_layer, proj, self.lora))


def merge_lora(ckpt_path: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", dtype: str = "bfloat16",
               quant: str = "f16", force: bool = False, progress: bool = False) -> str:
    """Write a LoRA run's merged model as a Hugging Face directory (fmt="hf", in `dtype`) or a GGUF
    file (fmt="gguf", as `quant`), streaming from the base; returns the output path."""
    run_dir, step = ckpt.resolve_checkpoint(ckpt_path)
    info = run_lora(run_dir)
    if info is None:
        raise ckpt.RunDirError(f"{run_dir} is not a LoRA run (no lora: section in its config.yaml); export a "
                               "plain run with `phi3jax convert orbax-to-hf` or `to-gguf`")
    if fmt not in ("hf", "gguf"):
        raise ValueError(f"unknown format {fmt!r}; use hf or gguf")
    lora, init_from = info
    base, _ = open_base(init_from)
    check_same_model(ckpt.model_config(run_dir), base.cfg, run_dir)
    adapters = restore_adapters(run_dir, step, base.cfg, lora)
    source = MergedSource(base, adapters, lora)
    if fmt == "gguf":
        from phi3jax.convert.gguf import load_sentencepiece_tokenizer, write_gguf

        name = os.path.basename(os.path.normpath(run_dir))  # write_gguf makes it general.name (gguf_name)
        if base.cfg.sliding_window:
            print(f"phi3jax convert: note: llama.cpp ignores Phi-3's sliding window ({base.cfg.sliding_window})",
                  file=sys.stderr)
        return write_gguf(source, load_sentencepiece_tokenizer(run_dir), out, quant=quant, force=force,
                          progress=progress, name=name)
    from phi3jax.convert.hf_tokenizer import check_tokenizer_dir

    tokenizer = check_tokenizer_dir(run_dir)
    write_hf_directory(source, out, dtype, overwrite=force, tokenizer_dir=run_dir, progress=progress,
                       stop_tokens=tokenizer.stop_ids if tokenizer is not None else ())
    return os.path.abspath(os.fspath(out))
