"""safetensors files, read and written one tensor (or one block of a tensor) at a time.

A checkpoint is one `model.safetensors` or shards listed in `model.safetensors.index.json`. Reading
uses plain file reads rather than mmap, so only the tensor being read counts against resident
memory; every shard's header is checked up front, so a truncated or corrupt file fails before
anything is written. Writing knows the header up front (names, dtypes, shapes), so each tensor
goes straight to disk.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

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

    def __init__(self, directory: str, single_file: str = SINGLE_FILE):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, single_file)
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
            raise CheckpointError(f"{directory} has no {single_file} or {INDEX_FILE}")
        self._headers: dict[str, tuple[dict[str, dict[str, Any]], int]] = {}
        self._handles: dict[str, Any] = {}
        self.block_bytes_read = 0  # by get_block: what sharded loading actually copied
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

    def get_block(self, name: str, *index: tuple[int, int]) -> np.ndarray:
        """A block of a tensor: [lo, hi) per leading dimension, through safetensors' lazy slicing
        (only the requested bytes are copied)."""
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="np")
        block = self._handles[file].get_slice(name)[tuple(slice(lo, hi) for lo, hi in index)]
        self.block_bytes_read += block.nbytes
        return np.asarray(block)

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


