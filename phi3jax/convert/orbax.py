"""Orbax run directories <-> Hugging Face directories, streaming one layer at a time.

A full-size Phi-3-mini is 7.6 GB in bfloat16 and one stacked leaf (`layers/mlp/gate`,
[32, 3072, 8192]) is 1.6 GB by itself (3.2 GB in float32), so neither direction may hold a
stacked leaf whole:

* writing (`hf-to-orbax`): the params item is saved through orbax's own machinery (so
  `restore_params`, `load_run` and `train.py init_from=ckpt:` read it like any other checkpoint),
  but its leaves are lazy: a type handler opens each leaf's tensorstore array and fills it one
  layer slice at a time, with one zarr chunk per layer.
* reading (`orbax-to-hf`, `to-gguf --ckpt`): each leaf is opened with tensorstore from the
  checkpoint's own metadata and read one `[l]` slice at a time.

Peak memory is then about one layer of parameters plus one chunk, whatever the model size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from phi3jax.config import Phi3Config
from phi3jax.convert.files import atomic_directory, progress_bar
from phi3jax.convert.hf import HFSource, ParamSource, write_hf_directory
from phi3jax.convert.keys import Key, hf_keys, layer_keys
from phi3jax.convert.safetensors import CheckpointError, np_dtype
from phi3jax.model import abstract_params
from phi3jax.train import checkpoint as ckpt


def _keys_by_path(cfg: Phi3Config) -> dict[str, Key]:
    """Checkpoint leaf path ("layers/attn/kv", "embed") -> its key."""
    return {f"layers/{k.leaf}" if k.per_layer else k.leaf: k for k in hf_keys(cfg)}


def _leaf_paths(tree: Any) -> dict[str, Any]:
    """'a/b/c' -> leaf of a nested dict."""
    return flatten_dict(dict(tree), sep="/")


def _ts_context(use_ocdbt: bool) -> Any:
    import tensorstore as ts

    # No chunk cache (every chunk is read once, a cache would only hold memory); orbax's small
    # cache for OCDBT B-tree nodes.
    spec: dict[str, Any] = {"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 2},
                            "file_io_concurrency": {"limit": 8}}
    if use_ocdbt:
        spec["cache_pool#ocdbt"] = {"total_bytes_limit": 100_000_000}
    return ts.Context(spec)


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Silence orbax's absl warnings about our deliberate choices (per-layer chunks, our handler)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------- reading
class OrbaxSource(ParamSource):
    """The params of a run directory's latest step (or of a step directory), read by layer slices."""

    def __init__(self, path: str | os.PathLike):
        import orbax.checkpoint as ocp
        from etils import epath

        self.run_dir, self.step = ckpt.resolve_checkpoint(path)
        if ckpt.read_run_config(self.run_dir).get("lora"):
            raise ckpt.RunDirError(f"{self.run_dir} is a LoRA run: its checkpoints hold only adapters. Export the "
                                   "merged model with `phi3jax convert merge-lora --ckpt RUN --out OUT` (HF or "
                                   "--format gguf) or the adapters with `phi3jax convert lora-to-peft`")
        self.cfg = ckpt.model_config(self.run_dir)
        self.params_dir = os.path.join(self.run_dir, ckpt.CHECKPOINTS, str(self.step), "params")
        self.description = f"{self.run_dir} step {self.step}"
        if not os.path.isdir(self.params_dir):
            raise ckpt.RunDirError(f"{self.description}: no params item at {self.params_dir}")
        try:
            meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.params_dir))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CheckpointError(f"{self.params_dir}: cannot read the checkpoint's metadata ({e})") from None
        self._use_zarr3 = bool(getattr(meta, "use_zarr3", False))
        self._ocdbt = bool(ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(self.params_dir)))
        self._meta = _leaf_paths(meta.tree if hasattr(meta, "tree") else meta)
        expected = _leaf_paths(abstract_params(self.cfg))
        missing = sorted(set(expected) - set(self._meta))
        if missing:
            raise CheckpointError(f"{self.params_dir}: leaf {missing[0]} is missing ({len(missing)} in all) for "
                                  "the model in config.yaml")
        extra = sorted(set(self._meta) - set(expected))
        if extra:
            raise CheckpointError(f"{self.params_dir}: unexpected leaf {extra[0]} ({len(extra)} in all); it does "
                                  "not belong to a Phi-3 model of the config in config.yaml")
        dtypes = set()
        for path, want in expected.items():
            got = self._meta[path]
            if tuple(got.shape) != tuple(want.shape):
                raise CheckpointError(f"{self.params_dir}: leaf {path} has shape {list(got.shape)}, but config.yaml "
                                      f"implies {list(want.shape)}")
            dtype = np.dtype(got.dtype)
            if dtype.name not in ("float32", "bfloat16", "float16"):
                raise CheckpointError(f"{self.params_dir}: leaf {path} has dtype {dtype}; expected a floating type")
            dtypes.add(dtype.name)
        self.dtype = np_dtype(next(d for d in ("float32", "float16", "bfloat16") if d in dtypes))
        self._warn_about_chunks()
        self._stores: dict[str, Any] = {}
        self._context = _ts_context(self._ocdbt)

    def _warn_about_chunks(self) -> None:
        for path in (k.leaf for k in layer_keys(self.cfg)):
            meta = self._meta[f"layers/{path}"]
            chunk = getattr(getattr(meta, "storage", None), "chunk_shape", None)
            if chunk and chunk[0] > 1:
                nbytes = int(np.prod(chunk)) * np.dtype(meta.dtype).itemsize
                if nbytes > 256 * 2**20:
                    print(f"phi3jax convert: warning: {self.params_dir} stores layers/{path} in chunks of {chunk[0]} "
                          f"layers ({nbytes / 2**30:.1f} GiB each); reading it one layer at a time decodes whole "
                          "chunks, so memory grows by that much. Checkpoints written by `phi3jax convert` (and "
                          "`save_params`) keep one chunk per layer.", file=sys.stderr)
                    return

    def _store(self, path: str) -> Any:
        if path not in self._stores:
            import tensorstore as ts
            from etils import epath
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
            from orbax.checkpoint.type_handlers import ParamInfo

            name = self._meta[path].name
            info = ParamInfo(name=name, parent_dir=epath.Path(self.params_dir), is_ocdbt_checkpoint=self._ocdbt,
                             use_zarr3=self._use_zarr3, ts_context=self._context)
            spec = ts_utils.build_array_read_spec(info, use_ocdbt=self._ocdbt).json
            try:
                self._stores[path] = ts.open(ts.Spec(spec), open=True, read=True, context=self._context).result()
            except ValueError as e:
                raise CheckpointError(f"{self.params_dir}: cannot open leaf {path} ({e})") from None
        return self._stores[path]

    def _read(self, path: str, index: Any = ()) -> np.ndarray:
        try:
            return np.asarray(self._store(path)[index].read().result())
        except ValueError as e:
            raise CheckpointError(f"{self.params_dir}: cannot read leaf {path} ({e}); the checkpoint may be "
                                  "incomplete or corrupt") from None

    def leaf(self, key: Key, layer: int | None) -> np.ndarray:
        return self._read(key.leaf) if layer is None else self._read(f"layers/{key.leaf}", layer)


# ----------------------------------------------------------------------------- writing
class _LazyLeaf:
    """A params leaf orbax saves without it ever being whole in memory (see `_StreamingHandler`)."""

    def __init__(self, writer: _StreamingWrite, path: str, shape: tuple[int, ...]):
        self.writer, self.path, self.shape = writer, path, tuple(shape)
        self.dtype = writer.dtype
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.stacked = path.startswith("layers/")


class _StreamingWrite:
    """One save: the source, the dtype to store, and a progress bar shared by every leaf."""

    def __init__(self, source: ParamSource, dtype: np.dtype, progress: bool):
        self.source, self.dtype = source, np.dtype(dtype)
        self.progress = progress


def _streaming_handler() -> Any:
    """An orbax TypeHandler for `_LazyLeaf` (registered once): numpy-array metadata and on-disk
    format, so the checkpoint restores like any other, but written a layer slice at a time."""
    from orbax.checkpoint import type_handlers

    class _StreamingHandler(type_handlers.NumpyHandler):
        def __init__(self) -> None:
            super().__init__(deepcopy_host_arrays=False)

        async def _background_serialize(self, values: Any, infos: Any, args: Any = None) -> None:
            import orbax.checkpoint as ocp
            import tensorstore as ts
            from orbax.checkpoint._src.serialization import ocdbt_utils
            from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

            stores = []
            for value, info in zip(values, infos, strict=True):
                await info.await_path_creation()
                # One chunk per layer: a slice write touches one chunk, and readers get per-layer access.
                chunk_bytes = int(np.prod(value.shape[1:])) * value.dtype.itemsize if value.stacked else None
                arg = ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if value.stacked else ())
                spec = ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint))
                stores.append(await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context))
            leaves = list(zip(values, stores, strict=True))
            write = values[0].writer
            source, cfg = write.source, write.source.cfg
            keys = _keys_by_path(cfg)
            stacked = [(v, t) for v, t in leaves if v.stacked]
            bar = progress_bar(len(leaves) - len(stacked) + len(stacked) * cfg.num_hidden_layers, "orbax",
                               write.progress)
            for value, store in leaves:
                if not value.stacked:
                    bar.set_postfix_str(value.path, refresh=False)
                    await store.write(np.asarray(source.leaf(keys[value.path], None), value.dtype))
                    bar.update(1)
            for l in range(cfg.num_hidden_layers if stacked else 0):
                bar.set_postfix_str(f"layers[{l}]", refresh=False)
                await asyncio.gather(*[store[l].write(np.asarray(source.leaf(keys[value.path], l), value.dtype))
                                       for value, store in stacked])
                bar.update(len(stacked))
            bar.close()

    return _StreamingHandler()


_HANDLER_REGISTERED = False


def save_params_streaming(run_dir: str, step: int, source: ParamSource, dtype: str | np.dtype | None = None,
                          progress: bool = False) -> None:
    """A params-only checkpoint step (like `checkpoint.save_params`) from a source, one layer at a time."""
    global _HANDLER_REGISTERED
    import orbax.checkpoint as ocp

    with _quiet_orbax():
        if not _HANDLER_REGISTERED:
            ocp.type_handlers.register_type_handler(_LazyLeaf, _streaming_handler(), override=True)
            _HANDLER_REGISTERED = True
    write = _StreamingWrite(source, np_dtype(dtype) if dtype is not None else source.dtype, progress)
    shapes = _leaf_paths(abstract_params(source.cfg))
    tree: dict[str, Any] = {}
    for path, abstract in shapes.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _LazyLeaf(write, path, abstract.shape)
    with _quiet_orbax(), ckpt.checkpoint_manager(run_dir, async_save=False) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(tree)))
        manager.wait_until_finished()


# ------------------------------------------------------------------------- conversions
def hf_to_orbax(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, force: bool = False,
                progress: bool = False, step: int = 0) -> Phi3Config:
    """A run directory (config.yaml, tokenizer, checkpoints/<step>/ params) from a HF directory.

    dtype: the dtype to store (default: the checkpoint's own). Everything is validated before the
    output is created (the special ids of config.json against the tokenizer too, which
    `orbax-to-hf` needs); the run directory is built under a temporary name and renamed when complete.
    """
    from phi3jax.convert.hf_tokenizer import check_special_ids
    from phi3jax.tokenizer import Tokenizer

    source = HFSource(hf_dir)
    target = np_dtype(dtype) if dtype else source.dtype
    cfg = source.cfg.replace(dtype=target.name, param_dtype=target.name)
    if os.path.isfile(os.path.join(source.directory, "tokenizer.model")):
        check_special_ids(Tokenizer.load(source.directory), cfg, source.directory)
    else:
        print(f"phi3jax convert: warning: {source.directory} has no tokenizer.model; its tokenizer files are copied "
              "as they are, but phi3jax's own tokenizer (generate, chat, train) needs a SentencePiece model",
              file=sys.stderr)
    with atomic_directory(out, overwrite=force) as tmp:
        ckpt.write_yaml(os.path.join(tmp, ckpt.CONFIG_FILE), {"model": ckpt.model_fields(cfg)})
        ckpt.copy_tokenizer_files(source.directory, tmp)
        save_params_streaming(tmp, step, source, target, progress=progress)
    return cfg


def orbax_to_hf(ckpt_path: str | os.PathLike, out: str | os.PathLike, dtype: str = "bfloat16", force: bool = False,
                max_shard_bytes: int = 2 * 2**30, progress: bool = False) -> Phi3Config:
    """A Hugging Face directory (config, generation config, sharded safetensors, tokenizer) from a run
    directory or step directory, one layer at a time."""
    from phi3jax.convert.hf_tokenizer import check_tokenizer_dir

    source = OrbaxSource(ckpt_path)
    tokenizer = check_tokenizer_dir(source.run_dir)
    stops = tokenizer.stop_ids if tokenizer is not None else ()
    return write_hf_directory(source, out, dtype, max_shard_bytes, overwrite=force, stop_tokens=stops,
                              tokenizer_dir=source.run_dir, progress=progress)
