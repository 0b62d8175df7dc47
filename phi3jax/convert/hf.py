"""Hugging Face checkpoints (config.json + safetensors) <-> phi3jax parameters.

HF stores attention as one fused `qkv_proj` [(H + 2 KV) * hd, D] and the MLP input as one
fused `gate_up_proj` [2 I, D], PyTorch-style [out, in]. phi3jax keeps heads explicit
(q [D, H, hd], k/v [D, KV, hd], o [H, hd, D]) and gate/up as two [D, I] leaves. The mapping
below is pure reshapes and transposes, so a round trip is bit-identical.

Conversion streams: one HF tensor (or one layer's slice of a stacked leaf) at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from phi3jax.config import Phi3Config
from phi3jax.model import Params

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read."""


def np_dtype(name: str | np.dtype) -> np.dtype:
    if isinstance(name, np.dtype):
        return name
    if name not in NP_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(NP_DTYPES)}")
    return NP_DTYPES[name]


# ------------------------------------------------------------------------ the mapping
def _layer(l: int, name: str) -> str:
    return f"model.layers.{l}.{name}"


def hf_shapes(cfg: Phi3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF Phi-3 checkpoint of this config holds, with its shape, in file order."""
    d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, d)}
    for l in range(cfg.num_hidden_layers):
        shapes[_layer(l, "self_attn.qkv_proj.weight")] = (qkv, d)
        shapes[_layer(l, "self_attn.o_proj.weight")] = (d, cfg.num_attention_heads * cfg.head_dim)
        shapes[_layer(l, "mlp.gate_up_proj.weight")] = (2 * i, d)
        shapes[_layer(l, "mlp.down_proj.weight")] = (d, i)
        shapes[_layer(l, "input_layernorm.weight")] = (d,)
        shapes[_layer(l, "post_attention_layernorm.weight")] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def layer_from_hf(get: Callable[[str], np.ndarray], cfg: Phi3Config, l: int) -> dict[str, np.ndarray]:
    """One layer's phi3jax leaves (keys like 'attn/q') from its HF tensors."""
    d, h, kv, hd, i = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.intermediate_size)
    qkv = get(_layer(l, "self_attn.qkv_proj.weight"))  # rows: q heads, then k heads, then v heads
    q, k, v = np.split(qkv, [h * hd, (h + kv) * hd], axis=0)
    gate_up = get(_layer(l, "mlp.gate_up_proj.weight"))  # rows: gate, then up
    return {
        "attn/q": q.reshape(h, hd, d).transpose(2, 0, 1),
        "attn/k": k.reshape(kv, hd, d).transpose(2, 0, 1),
        "attn/v": v.reshape(kv, hd, d).transpose(2, 0, 1),
        "attn/o": get(_layer(l, "self_attn.o_proj.weight")).T.reshape(h, hd, d),
        "mlp/gate": gate_up[:i].T,
        "mlp/up": gate_up[i:].T,
        "mlp/down": get(_layer(l, "mlp.down_proj.weight")).T,
        "attn_norm/scale": get(_layer(l, "input_layernorm.weight")),
        "mlp_norm/scale": get(_layer(l, "post_attention_layernorm.weight")),
    }


def layer_to_hf(leaf: Callable[[str], np.ndarray], cfg: Phi3Config, l: int) -> dict[str, np.ndarray]:
    """One layer's HF tensors from its phi3jax leaves (`leaf('attn/q')` -> that layer's slice)."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = leaf("attn/q").transpose(1, 2, 0).reshape(h * hd, d)
    k = leaf("attn/k").transpose(1, 2, 0).reshape(kv * hd, d)
    v = leaf("attn/v").transpose(1, 2, 0).reshape(kv * hd, d)
    return {
        _layer(l, "self_attn.qkv_proj.weight"): np.concatenate([q, k, v], axis=0),
        _layer(l, "self_attn.o_proj.weight"): np.ascontiguousarray(leaf("attn/o").reshape(h * hd, d).T),
        _layer(l, "mlp.gate_up_proj.weight"): np.concatenate([leaf("mlp/gate").T, leaf("mlp/up").T], axis=0),
        _layer(l, "mlp.down_proj.weight"): np.ascontiguousarray(leaf("mlp/down").T),
        _layer(l, "input_layernorm.weight"): leaf("attn_norm/scale"),
        _layer(l, "post_attention_layernorm.weight"): leaf("mlp_norm/scale"),
    }


LAYER_LEAVES = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down",
                "attn_norm/scale", "mlp_norm/scale")


def _get_path(tree: Params, path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def iter_hf_tensors(params: Params, cfg: Phi3Config, dtype: np.dtype | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) in file order, one layer slice at a time."""

    def host(x: Any) -> np.ndarray:
        arr = np.asarray(x)
        return arr if dtype is None else arr.astype(dtype, copy=False)

    yield "model.embed_tokens.weight", host(params["embed"])
    layers = params["layers"]
    for l in range(cfg.num_hidden_layers):
        yield from layer_to_hf(lambda p, l=l: host(_get_path(layers, p)[l]), cfg, l).items()
    yield "model.norm.weight", host(params["final_norm"]["scale"])
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(host(params["lm_head"]).T)


# ---------------------------------------------------------------------------- reading
class SafetensorsReader:
    """Tensor name -> lazily read array over one file or an index of shards."""

    def __init__(self, directory: str):
        self.directory = directory
        self._handles: dict[str, Any] = {}
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        elif os.path.isfile(single):
            self.files = {name: single for name in self._open(single).keys()}
        else:
            bins = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))]
            if bins:
                raise CheckpointError(
                    f"{directory} holds only pickled PyTorch weights ({bins[0]}, ...). phi3jax reads "
                    "safetensors only, since pickles can run arbitrary code. Convert once with "
                    "transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                    "safe_serialization=True)")
            raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is listed in the index but does not exist")
            try:
                self._handles[file] = safe_open(file, framework="np")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file may be "
                                      "truncated or corrupt, download or write it again") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.files)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._open(self.files[name]).get_slice(name)
        dtype = sl.get_dtype()
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype)

    def get(self, name: str) -> np.ndarray:
        try:
            return self._open(self.files[name]).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name} ({e})") from None


def validate_hf_tensors(reader: SafetensorsReader, cfg: Phi3Config) -> str:
    """Check names, shapes and dtypes against the config; return the checkpoint dtype."""
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
        dtypes.add(dtype)
    # A checkpoint in one dtype keeps it; a mixed one loads in the widest.
    for candidate in ("float32", "float16", "bfloat16"):
        if candidate in dtypes:
            return candidate
    raise AssertionError("unreachable")


def load_hf(directory: str | os.PathLike, dtype: str | None = None, mesh: Any = None
            ) -> tuple[Phi3Config, Params]:
    """Read a Hugging Face Phi-3 directory into (config, params).

    dtype: parameter dtype to load as (default: the checkpoint's own). The config's compute
    dtype follows it. Tensors are read one at a time; stacked layer leaves are filled slice by slice.
    mesh: a `jax.sharding.Mesh` (phi3jax.sharding.make_mesh): every parameter is placed per the
    sharding rules, each device's block read straight from the safetensors files (see
    `phi3jax.convert.hf_sharded`); no process reads more than its own devices hold.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory; pass a Hugging Face model directory")
    cfg = Phi3Config.from_hf(directory)
    reader = SafetensorsReader(directory)
    stored = validate_hf_tensors(reader, cfg)
    dtype = dtype or stored
    target = np_dtype(dtype)
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    if mesh is not None:
        from phi3jax.convert.hf_sharded import load_sharded

        return cfg, load_sharded(reader.files, cfg, target, mesh)

    def get(name: str) -> np.ndarray:
        return reader.get(name).astype(target, copy=False)

    layers: dict[str, np.ndarray] = {}
    for l in range(cfg.num_hidden_layers):
        for path, arr in layer_from_hf(get, cfg, l).items():
            if path not in layers:
                layers[path] = np.empty((cfg.num_hidden_layers, *arr.shape), target)
            layers[path][l] = arr
    params: Params = {"embed": get("model.embed_tokens.weight"), "layers": {},
                      "final_norm": {"scale": get("model.norm.weight")}}
    for path, arr in layers.items():
        module, leaf = path.split("/")
        params["layers"].setdefault(module, {})[leaf] = arr
    if not cfg.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("lm_head.weight").T)
    return cfg, jax.tree.map(jax.numpy.asarray, params)


# ---------------------------------------------------------------------------- writing
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
                     dtype: np.dtype, max_shard_bytes: int) -> None:
    """Write a stream of HF tensors as (sharded) safetensors + index into an existing directory."""
    shards = plan_shards(cfg, dtype.itemsize, max_shard_bytes)
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    owner = {name: files[k] for k, names in enumerate(shards) for name in names}
    pending: dict[str, np.ndarray] = {}
    total = 0
    for k, names in enumerate(shards):
        while len(pending) < len(names):
            name, arr = next(tensors)
            if owner.get(name) != files[k]:
                raise AssertionError(f"tensor {name} arrived out of order")
            pending[name] = np.ascontiguousarray(arr.astype(dtype, copy=False))
            total += pending[name].nbytes
        save_file(pending, os.path.join(directory, files[k]), metadata={"format": "pt"})
        pending = {}
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": owner}
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


class atomic_directory:
    """Build a directory under a temporary name; rename it into place only on success.

    An existing output is never touched unless overwrite=True, and then only after the new
    one is complete.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} already exists; choose another output or pass "
                                  "overwrite=True (--force on the command line)")
        self.tmp = ""

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        if os.path.exists(self.path):
            old = self.tmp + ".old"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.path)


def save_hf(params: Params, cfg: Phi3Config, directory: str | os.PathLike, dtype: str = "bfloat16",
            max_shard_bytes: int = 2 * 2**30, overwrite: bool = False,
            stop_tokens: tuple[int, ...] = ()) -> None:
    """Write a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json, generation_config.json (eos = the config's eos plus `stop_tokens`) and
    safetensors shards of at most `max_shard_bytes` with an index. Written to a temporary
    directory and renamed into place when complete.
    """
    target = np_dtype(dtype)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config = cfg.to_hf_dict()
        config["torch_dtype"] = dtype
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg, stop_tokens))
        write_hf_tensors(iter_hf_tensors(params, cfg, target), cfg, tmp, target, max_shard_bytes)
