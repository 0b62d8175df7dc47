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
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np

from phi3jax.config import Phi3Config
from phi3jax.model import Params

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                         "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
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


TOP_LEAVES = ("embed", "final_norm/scale", "lm_head")


class ParamSource:
    """Parameters read piece by piece: one top-level leaf or one layer's slices at a time.

    The converters stream through this, so no stacked [layers, ...] leaf is ever whole in memory.
    Subclasses: `TreeSource` (params in memory), `HFSource` (safetensors), `OrbaxSource` (a checkpoint).
    """

    cfg: Phi3Config
    dtype: np.dtype  # the dtype the parameters are stored in
    description: str = ""

    def top(self, path: str) -> np.ndarray:
        """A top-level leaf in phi3jax layout: 'embed' [V, D], 'final_norm/scale' [D], 'lm_head' [D, V]."""
        raise NotImplementedError

    def layer(self, l: int) -> dict[str, np.ndarray]:
        """Layer l of every stacked leaf (keys `LAYER_LEAVES`), phi3jax layout."""
        raise NotImplementedError

    def top_leaves(self) -> tuple[str, ...]:
        return TOP_LEAVES[:2] if self.cfg.tie_word_embeddings else TOP_LEAVES

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, array in the stored dtype) in file order, one layer at a time."""
        cfg = self.cfg
        yield "model.embed_tokens.weight", self.top("embed")
        for l in range(cfg.num_hidden_layers):
            yield from layer_to_hf(self.layer(l).__getitem__, cfg, l).items()
        yield "model.norm.weight", self.top("final_norm/scale")
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", np.ascontiguousarray(self.top("lm_head").T)


class TreeSource(ParamSource):
    """A params tree already in (host or device) memory."""

    def __init__(self, params: Params, cfg: Phi3Config):
        self.params, self.cfg = params, cfg
        self.dtype = np.dtype(np.asarray(params["final_norm"]["scale"]).dtype)
        self.description = "params in memory"

    def top(self, path: str) -> np.ndarray:
        return np.asarray(_get_path(self.params, path))

    def layer(self, l: int) -> dict[str, np.ndarray]:
        return {path: np.asarray(_get_path(self.params["layers"], path)[l]) for path in LAYER_LEAVES}


def iter_hf_tensors(params: Params, cfg: Phi3Config, dtype: np.dtype | None = None
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) in file order, one layer slice at a time."""
    for name, arr in TreeSource(params, cfg).hf_tensors():
        yield name, arr if dtype is None else arr.astype(dtype, copy=False)


# ---------------------------------------------------------------------------- reading
_HEADER_LIMIT = 100 * 2**20  # safetensors' own cap on the JSON header


def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor name -> {dtype, shape, data_offsets}, data start) of one safetensors file.

    Checks what can be checked without reading the data: the header parses, every tensor's byte
    range matches its shape and dtype, and lies inside the file (a truncated download fails here,
    naming the first tensor it cuts).
    """
    def corrupt(problem: str) -> CheckpointError:
        return CheckpointError(f"{file}: not a valid safetensors file ({problem}); the file may be truncated "
                               "or corrupt, download or write it again")

    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > _HEADER_LIMIT or 8 + n > size:
            raise corrupt(f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name} has a malformed entry {entry!r}") from None
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and hi - lo != int(np.prod(shape)) * itemsize:
            raise corrupt(f"tensor {name} spans {hi - lo} bytes but shape {shape} of {dtype} needs "
                          f"{int(np.prod(shape)) * itemsize}")
        if not 0 <= lo <= hi or data_start + hi > size:
            raise corrupt(f"tensor {name} ends at byte {data_start + hi}, past the end of the file ({size} bytes)")
    return header, data_start


class SafetensorsReader:
    """Tensor name -> array read on demand, over one file or an index of shards.

    Reads with plain file reads rather than mmap, so only the tensor being read counts against
    resident memory (a mapped 5 GB shard would count in full once touched). Every shard's header
    is parsed and checked up front, so a truncated or corrupt file fails before anything is written.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        elif os.path.isfile(single):
            self.files = {}
        else:
            bins = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if bins:
                raise CheckpointError(
                    f"{directory} holds only pickled PyTorch weights ({bins[0]}, ...). phi3jax reads "
                    "safetensors only, since unpickling can run arbitrary code. Convert once, in an environment "
                    "you trust, with transformers: AutoModelForCausalLM.from_pretrained(DIR, torch_dtype='auto')"
                    ".save_pretrained(OUT) (safetensors is its default), then convert OUT")
            raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")
        self._headers: dict[str, tuple[dict[str, dict[str, Any]], int]] = {}
        for file in sorted(set(self.files.values()) or {single}):
            if not os.path.isfile(file):
                raise CheckpointError(f"{file} is listed in {INDEX_FILE} but does not exist")
            self._headers[file] = read_safetensors_header(file)
        if not self.files:
            self.files = {name: single for name in self._headers[single][0]}
        for name, file in self.files.items():
            if name not in self._headers[file][0]:
                raise CheckpointError(f"{INDEX_FILE} puts tensor {name} in {os.path.basename(file)}, "
                                      "which does not hold it")

    def names(self) -> set[str]:
        return set(self.files)

    def _entry(self, name: str) -> tuple[str, dict[str, Any], int]:
        file = self.files[name]
        header, start = self._headers[file]
        return file, header[name], start

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        _, entry, _ = self._entry(name)
        return tuple(int(d) for d in entry["shape"]), _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])

    def nbytes(self, name: str) -> int:
        _, entry, _ = self._entry(name)
        lo, hi = entry["data_offsets"]
        return hi - lo

    def get(self, name: str) -> np.ndarray:
        file, entry, start = self._entry(name)
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name} has dtype {entry['dtype']}, not one of "
                                  f"{sorted(_SAFETENSORS_DTYPES)}")
        lo, hi = entry["data_offsets"]
        out = np.empty([int(d) for d in entry["shape"]], NP_DTYPES[dtype])
        with open(file, "rb") as f:
            f.seek(start + lo)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != hi - lo:
            raise CheckpointError(f"{file}: tensor {name} is cut short ({got} of {hi - lo} bytes); the file "
                                  "is truncated, download or write it again")
        return out


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
    for candidate in ("float32", "float16", "bfloat16"):
        if candidate in dtypes:
            return candidate
    raise AssertionError("unreachable")


def load_hf(directory: str | os.PathLike, dtype: str | None = None) -> tuple[Phi3Config, Params]:
    """Read a Hugging Face Phi-3 directory into (config, params).

    dtype: parameter dtype to load as (default: the checkpoint's own). The config's compute
    dtype follows it. Tensors are read one at a time; stacked layer leaves are filled slice by slice.
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

    return cfg, params_from_hf_tensors(reader.get, cfg, target)


def params_from_hf_tensors(get_tensor: Callable[[str], np.ndarray], cfg: Phi3Config, dtype: np.dtype) -> Params:
    """A params tree (jax arrays of `dtype`) from a HF-name -> array getter."""

    def get(name: str) -> np.ndarray:
        return get_tensor(name).astype(dtype, copy=False)

    target = dtype
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
    return jax.tree.map(jax.numpy.asarray, params)


class HFSource(ParamSource):
    """A Hugging Face directory, read tensor by tensor; validated in full when opened."""

    def __init__(self, directory: str | os.PathLike):
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory!r} is not a directory; pass a Hugging Face model directory")
        self.directory = directory
        self.description = directory
        self.cfg = Phi3Config.from_hf(directory)
        self.reader = SafetensorsReader(directory)
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        declared = raw.get("torch_dtype") or raw.get("dtype")
        self.dtype = np_dtype(validate_hf_tensors(self.reader, self.cfg, declared_dtype=declared))
        self.cfg = self.cfg.replace(dtype=self.dtype.name, param_dtype=self.dtype.name)

    def top(self, path: str) -> np.ndarray:
        if path == "embed":
            return self.reader.get("model.embed_tokens.weight")
        if path == "final_norm/scale":
            return self.reader.get("model.norm.weight")
        if path == "lm_head":
            return self.reader.get("lm_head.weight").T
        raise KeyError(path)

    def layer(self, l: int) -> dict[str, np.ndarray]:
        return layer_from_hf(self.reader.get, self.cfg, l)

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in hf_shapes(self.cfg):  # already in HF layout: read straight through
            yield name, self.reader.get(name)


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


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header is known up front (names, dtypes,
    shapes), so each tensor goes straight to disk and only one is ever held in memory."""

    def __init__(self, path: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, np.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in specs:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype.name], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as safetensors does
        self.path = path
        self.nbytes = offset
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        expected, dtype, shape = self._order[self._next]
        if name != expected or arr.dtype != dtype or tuple(arr.shape) != shape:
            raise AssertionError(f"{self.path}: expected {expected} {dtype} {list(shape)}, got {name} "
                                 f"{arr.dtype} {list(arr.shape)}")
        self._f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._order):
            raise AssertionError(f"{self.path}: {len(self._order) - self._next} tensors were never written")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


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


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar counting tensors (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


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
        write_hf_tensors(TreeSource(params, cfg).hf_tensors(), cfg, tmp, target, max_shard_bytes)
