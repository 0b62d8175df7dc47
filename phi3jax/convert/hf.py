"""Hugging Face checkpoints (config.json + safetensors) <-> phi3jax parameters.

    cfg, params = load_hf("Phi-3-mini-4k-instruct")              # optional mesh=: each device's block
    save_hf(params, cfg, "out_dir", dtype="bfloat16")            # transformers.from_pretrained loads it

The layout map is the key table (`phi3jax.convert.keys`). A directory is validated in one place,
when it is opened (`HFSource`: config, tensor names, shapes and dtypes against config.json's
`torch_dtype`), then read whole, or one device's block at a time under a mesh. One writer
(`write_hf_directory`) serves `save_hf` and `phi3jax convert orbax-to-hf`. Everything streams: one
HF tensor (or one layer's slice of a stacked leaf) in memory at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.convert.files import atomic_directory, progress_bar, write_json
from phi3jax.convert.keys import Key, hf_keys, hf_shapes, hf_tensors_of
from phi3jax.convert.safetensors import (
    INDEX_FILE,
    NP_DTYPES,
    SINGLE_FILE,
    CheckpointError,
    SafetensorsReader,
    SafetensorsWriter,
    np_dtype,
)
from phi3jax.lora import get as _at
from phi3jax.model import Params, layers_stacked, param_shardings

__all__ = ["CheckpointError", "HFSource", "ParamSource", "TreeSource", "load_hf", "save_hf", "write_hf_directory"]


# ------------------------------------------------------------------------ sources
class ParamSource:
    """Parameters read one leaf (one layer's slice of a stacked leaf) at a time, in phi3jax's layout.

    The converters stream through this, so no stacked [layers, ...] leaf is ever whole in memory.
    Sources: `TreeSource` (params in memory), `HFSource` (safetensors), `OrbaxSource` (a checkpoint).
    """

    cfg: Phi3Config
    dtype: np.dtype  # the dtype the parameters are stored in
    description: str = ""

    def leaf(self, key: Key, layer: int | None) -> np.ndarray:
        """The leaf `key` names (of layer `layer` for a per-layer key), phi3jax layout."""
        raise NotImplementedError

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, array in the stored dtype) in file order, one layer at a time."""
        return hf_tensors_of(self.cfg, self.leaf)


class TreeSource(ParamSource):
    """A params tree already in (host or device) memory, layers stacked or per layer."""

    def __init__(self, params: Params, cfg: Phi3Config):
        self.params, self.cfg = params, cfg
        self.dtype = np.dtype(np.asarray(params["final_norm"]["scale"]).dtype)
        self.description = "params in memory"

    def leaf(self, key: Key, layer: int | None) -> np.ndarray:
        if layer is None:
            return np.asarray(_at(self.params, key.leaf))
        if layers_stacked(self.params):
            return np.asarray(_at(self.params["layers"], key.leaf)[layer])
        return np.asarray(_at(self.params[f"layers_{layer}"], key.leaf))


class HFSource(ParamSource):
    """A Hugging Face directory, validated in full when opened, read tensor by tensor or block by block."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory!r} is not a directory; pass a Hugging Face model directory")
        self.directory = self.description = directory
        cfg = Phi3Config.from_hf(directory)
        self.reader = SafetensorsReader(directory)
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        declared = raw.get("torch_dtype") or raw.get("dtype")
        self.dtype = np_dtype(validate_hf_tensors(self.reader, cfg, declared_dtype=declared))
        self.cfg = cfg.replace(dtype=self.dtype.name, param_dtype=self.dtype.name)

    def leaf(self, key: Key, layer: int | None) -> np.ndarray:
        tensor = self.reader.get(key.hf_name(layer))
        return key.to_ours(tensor[key.row_start:key.row_start + key.num_rows] if key.in_dims else tensor)

    def block(self, key: Key, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of one layer's leaf, reading only the HF rows and columns it holds."""
        rows, cols = key.block_runs(index)
        name = key.hf_name(layer)
        pieces = [np.concatenate([self.reader.get_block(name, r, c) for c in cols], axis=1) if cols
                  else self.reader.get_block(name, r) for r in rows]
        block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
        dims = [hi - lo for lo, hi in (s.indices(n)[:2] for s, n in zip(index, key.shape, strict=True))]
        n_in = len(key.in_dims)
        return key.to_ours(block, tuple(dims[n_in:]), tuple(dims[:n_in]))

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in hf_shapes(self.cfg):  # already in HF layout: read straight through
            yield name, self.reader.get(name)


def validate_hf_tensors(reader: SafetensorsReader, cfg: Phi3Config, declared_dtype: str | None = None) -> str:
    """Check names, shapes and dtypes against the config; return the checkpoint dtype.

    declared_dtype: config.json's torch_dtype; when given, every tensor must be stored in it.
    """
    expected = hf_shapes(cfg)
    names = reader.names()
    # Some exports keep the rotary buffers; they are derived from the config.
    names = {n for n in names if not n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store a copy
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(f"{reader.directory}: tensor {missing[0]} is missing "
                              f"({len(missing)} missing in all) for the config in config.json")
    extra = sorted(names - set(expected))
    if extra:
        raise CheckpointError(f"{reader.directory}: unexpected tensor {extra[0]} ({len(extra)} in all); "
                              "it does not belong to a Phi-3 model of this config")
    dtypes = set()
    for name, shape in expected.items():
        got, dtype = reader.shape_and_dtype(name)
        if got != shape:
            raise CheckpointError(f"{reader.directory}: tensor {name} has shape {list(got)}, but config.json "
                                  f"implies {list(shape)}")
        if dtype not in NP_DTYPES:
            raise CheckpointError(f"{reader.directory}: tensor {name} has dtype {dtype}; expected a "
                                  f"floating type among {sorted(NP_DTYPES)}")
        if declared_dtype in NP_DTYPES and dtype != declared_dtype:
            raise CheckpointError(f"{reader.directory}: tensor {name} is stored as {dtype}, but config.json "
                                  f"declares torch_dtype {declared_dtype}")
        dtypes.add(dtype)
    # A checkpoint in one dtype keeps it; a mixed one loads in the widest.
    return next(candidate for candidate in ("float32", "float16", "bfloat16") if candidate in dtypes)


# ------------------------------------------------------------------------ reading
def load_hf(directory: str | os.PathLike, dtype: str | None = None, mesh: Any = None
            ) -> tuple[Phi3Config, Params]:
    """Read a Hugging Face Phi-3 directory into (config, params), layers stacked.

    dtype: parameter dtype to load as (default: the checkpoint's own); the config's compute dtype
    follows it. mesh: a `jax.sharding.Mesh` (`phi3jax.parallel.make_mesh`): every parameter is
    placed per the sharding rules, each device's block read straight from the safetensors files;
    no process reads more than its own devices hold.
    """
    source = HFSource(directory)
    target = np_dtype(dtype or source.dtype.name)
    cfg = source.cfg.replace(dtype=target.name, param_dtype=target.name)
    if mesh is not None:
        return cfg, _load_blocks(source, cfg, target, mesh)
    return cfg, _load_whole(source, cfg, target)


def _nest(flat: dict[str, Any]) -> Params:
    out: Params = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return out


def _load_whole(source: HFSource, cfg: Phi3Config, dtype: np.dtype) -> Params:
    flat: dict[str, Any] = {}
    for key in hf_keys(cfg):
        if not key.per_layer:
            flat[key.leaf] = source.leaf(key, None).astype(dtype, copy=False)
            continue
        stacked = np.empty((cfg.num_hidden_layers, *key.shape), dtype)
        for layer in range(cfg.num_hidden_layers):
            stacked[layer] = source.leaf(key, layer)
        flat[f"layers/{key.leaf}"] = stacked
    return jax.tree.map(jax.numpy.asarray, _nest(flat))


def _load_blocks(source: HFSource, cfg: Phi3Config, dtype: np.dtype, mesh: Any) -> Params:
    """Every leaf as a global array on `mesh`, built from each device's block (`HFSource.block`)."""
    shardings = param_shardings(cfg, mesh)
    memo: dict[tuple[str, tuple[tuple[int, int], ...]], np.ndarray] = {}

    def build(key: Key) -> tuple[str, jax.Array]:
        path = f"layers/{key.leaf}" if key.per_layer else key.leaf
        shape = (cfg.num_hidden_layers, *key.shape) if key.per_layer else key.shape

        def block(index: tuple[slice, ...]) -> np.ndarray:
            bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
            if (path, bounds) not in memo:  # devices holding the same block (replicas) share one read
                if key.per_layer:
                    layers = range(*bounds[0])
                    arr = np.stack([source.block(key, layer, index[1:]) for layer in layers])
                else:
                    arr = source.block(key, None, index)
                memo[(path, bounds)] = np.ascontiguousarray(arr.astype(dtype, copy=False))
            return memo[(path, bounds)]

        return path, jax.make_array_from_callback(shape, _at(shardings, path), block)

    return _nest(dict(build(key) for key in hf_keys(cfg)))


# ------------------------------------------------------------------------ writing
def generation_config(cfg: Phi3Config, stop_tokens: tuple[int, ...] = ()) -> dict[str, Any]:
    eos = list(dict.fromkeys([*cfg.eos_token_id, *stop_tokens]))
    return {"_from_model_config": False, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": cfg.pad_token_id}


def plan_shards(cfg: Phi3Config, itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names (file order) into shards of at most max_shard_bytes (one tensor may exceed)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in hf_shapes(cfg).items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hf_tensors(tensors: Iterator[tuple[str, np.ndarray]], cfg: Phi3Config, directory: str,
                     dtype: np.dtype, max_shard_bytes: int, progress: bool = False) -> None:
    """Write a stream of HF tensors (file order) as sharded safetensors + index into an existing
    directory, one tensor in memory at a time."""
    shards = plan_shards(cfg, dtype.itemsize, max_shard_bytes)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    shapes = hf_shapes(cfg)
    owner = {name: files[k] for k, names in enumerate(shards) for name in names}
    bar = progress_bar(len(shapes), "safetensors", progress)
    total = 0
    for k, names in enumerate(shards):
        with SafetensorsWriter(os.path.join(directory, files[k]), [(n, dtype, shapes[n]) for n in names]) as out:
            for _ in names:
                name, arr = next(tensors)
                bar.set_postfix_str(name, refresh=False)
                out.write(name, arr.astype(dtype, copy=False))
                bar.update(1)
            total += out.nbytes
    bar.close()
    if len(shards) > 1:
        write_json(os.path.join(directory, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": owner})


def write_hf_directory(source: ParamSource, directory: str | os.PathLike, dtype: str = "bfloat16",
                       max_shard_bytes: int = 2 * 2**30, overwrite: bool = False, stop_tokens: tuple[int, ...] = (),
                       tokenizer_dir: str | None = None, progress: bool = False) -> Phi3Config:
    """A directory that transformers' from_pretrained (and, with `tokenizer_dir`, AutoTokenizer) loads.

    config.json, generation_config.json (eos = the config's eos plus `stop_tokens`), safetensors
    shards of at most `max_shard_bytes` with an index, and the tokenizer of `tokenizer_dir` (built
    and checked against the config first). Built under a temporary name and renamed into place
    when complete.
    """
    target = np_dtype(dtype)
    cfg = source.cfg.replace(dtype=target.name, param_dtype=target.name)
    tokenizer = None
    if tokenizer_dir is not None:
        from phi3jax.convert.hf_tokenizer import HFTokenizerFiles

        tokenizer = HFTokenizerFiles(tokenizer_dir, cfg)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config = cfg.to_hf_dict()
        config["torch_dtype"] = target.name
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg, stop_tokens))
        write_hf_tensors(source.hf_tensors(), cfg, tmp, target, max_shard_bytes, progress=progress)
        if tokenizer is not None:
            tokenizer.write(tmp)
    return cfg


def save_hf(params: Params, cfg: Phi3Config, directory: str | os.PathLike, dtype: str = "bfloat16",
            max_shard_bytes: int = 2 * 2**30, overwrite: bool = False, stop_tokens: tuple[int, ...] = ()) -> None:
    """Write `params` as a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    write_hf_directory(TreeSource(params, cfg), directory, dtype, max_shard_bytes, overwrite, stop_tokens)
