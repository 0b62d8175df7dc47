"""The training config: named sections, YAML files and dotted command-line overrides.

    python train.py --config configs/tiny.yaml steps=500 optim.learning_rate=1e-3 model.remat_policy=full

Sections: `model` (a preset and/or any Phi3Config field), `data`, `optim`, `mesh`,
`distributed`, `log`, `lora` (absent: full training), `dpo` (with `objective: dpo`), `resume`; top-level
keys: `objective` (`lm` | `dpo`), `run_dir`, `steps`, `batch_size` (global), `seq_len`, `seed`,
`save_every`, `keep_checkpoints`, `async_checkpointing`, `init_from`. The dataclass defaults *are*
the CPU default recipe
(`configs/tiny.yaml` spells them out). Every key is checked: an unknown key or a value of the
wrong type is a `TrainConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from phi3jax.config import ConfigError, LoraConfig, Phi3Config
from phi3jax.parallel import DistributedConfig, MeshConfig
from phi3jax.train.dpo import DpoConfig
from phi3jax.train.step import OptimConfig

DATA_FORMATS = ("text", "jsonl", "array_record", "chat", "preference")
OBJECTIVES = ("lm", "dpo")
DEFAULT_CONFIG_NAME = "tiny"


class TrainConfigError(ValueError):
    """A training config key that does not exist or holds a bad value."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from. `path` None means the built-in corpus (CPython's pydoc topics)."""

    path: str | None = None  # a file, a directory or a glob
    format: str = "text"  # text | jsonl | array_record | chat | preference (objective: dpo)
    tokenizer: str | None = None  # tokenizer.model, a run dir or an HF dir; None trains one on the data
    vocab_size: int = 2048  # vocabulary of a tokenizer trained on the data
    val_path: str | None = None  # a separate validation set; else `val_fraction` of the documents
    val_fraction: float = 0.1  # share of the characters (documents picked by seed) held out
    text_key: str = "text"  # the JSONL / ArrayRecord field holding a document
    doc_separator: str | None = None  # text format: split files into documents at this string
    split_documents: bool | None = None  # may a document be split across rows? None: yes except for chat
    shuffle: bool = True
    seed: int | None = None  # shuffle seed; None: the top-level seed
    add_bos: bool = True  # text documents start with BOS ...
    add_eos: bool = True  # ... and end with <|endoftext|>


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10  # log train metrics every N steps (1 logs every step)
    eval_every: int = 100  # validation loss every N steps (0: only at the end)
    eval_batches: int = 0  # validation batches per evaluation (0: the whole split)
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True  # loss.png at the end
    baselines: bool = True  # unigram / bigram cross-entropy next to the validation loss
    peak_tflops: float | None = None  # per-device peak for MFU; None: the device's stated peak if known
    sample_prompt: str = "The for statement"  # generated from at the end ("" to skip)
    sample_tokens: int = 48


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    allow_changes: bool = False  # resume even though the config or the data differ from the saved run's


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig(learning_rate=3e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1)
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    log: LogConfig = LogConfig()
    run_dir: str | None = None  # None: runs/<config name>
    steps: int = 400
    batch_size: int = 8  # global, in rows of seq_len tokens
    seq_len: int = 256
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int | None = 3  # None keeps all
    async_checkpointing: bool = True
    init_from: str | None = None  # hf:DIR | ckpt:RUN_DIR_OR_STEP_DIR
    lora: LoraConfig | None = None  # train low-rank adapters on the frozen init_from model (LoRA / QLoRA)
    objective: str = "lm"  # lm: next-token loss | dpo: preference optimisation (the `dpo:` section)
    dpo: DpoConfig = DpoConfig()
    resume: ResumeConfig = ResumeConfig()
    name: str = DEFAULT_CONFIG_NAME  # the config's name (its file stem): names the default run_dir

    # ------------------------------------------------------------- derived
    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or os.path.join("runs", self.name)

    @property
    def data_seed(self) -> int:
        return self.seed if self.data.seed is None else self.data.seed

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- validation
def _check_ranges(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            raise TrainConfigError(f"{key}={value!r}: {what}")

    need(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1")
    need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    need(cfg.seq_len >= 2, "seq_len", cfg.seq_len, "must be >= 2")
    need(cfg.save_every >= 1, "save_every", cfg.save_every, "must be >= 1")
    need(cfg.keep_checkpoints is None or cfg.keep_checkpoints >= 1, "keep_checkpoints", cfg.keep_checkpoints,
         "must be >= 1 (or null to keep every checkpoint)")
    need(cfg.batch_size % cfg.optim.accum_steps == 0, "batch_size", cfg.batch_size,
         f"must be divisible by optim.accum_steps={cfg.optim.accum_steps}")
    need(cfg.data.format in DATA_FORMATS, "data.format", cfg.data.format, f"must be one of {DATA_FORMATS}")
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction", cfg.data.val_fraction, "must be in [0, 1)")
    need(cfg.data.vocab_size >= 64, "data.vocab_size", cfg.data.vocab_size, "must be >= 64")
    need(cfg.log.every >= 1, "log.every", cfg.log.every, "must be >= 1")
    need(cfg.log.eval_every >= 0, "log.eval_every", cfg.log.eval_every, "must be >= 0")
    need(cfg.log.eval_batches >= 0, "log.eval_batches", cfg.log.eval_batches, "must be >= 0")
    need(cfg.log.sample_tokens >= 1, "log.sample_tokens", cfg.log.sample_tokens, "must be >= 1")
    for axis in ("data", "fsdp", "tensor", "sequence"):
        size = getattr(cfg.mesh, axis)
        need(size == -1 or size >= 1, f"mesh.{axis}", size, "must be a positive size or -1 (all the rest)")
    need(sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor", "sequence")) <= 1, "mesh",
         dataclasses.asdict(cfg.mesh), "at most one axis may be -1")
    dist = cfg.distributed
    need(dist.num_processes is None or dist.num_processes >= 1, "distributed.num_processes",
         dist.num_processes, "must be >= 1")
    need(dist.process_id is None or dist.process_id >= 0, "distributed.process_id", dist.process_id, "must be >= 0")
    if dist.num_processes is not None and dist.process_id is not None:
        need(dist.process_id < dist.num_processes, "distributed.process_id", dist.process_id,
             f"must be < distributed.num_processes={dist.num_processes}")
    if cfg.init_from is not None:
        kind, _, where = cfg.init_from.partition(":")
        need(kind in ("hf", "ckpt") and bool(where), "init_from", cfg.init_from,
             "must be 'hf:HF_DIR' or 'ckpt:RUN_DIR_OR_STEP_DIR'")
    need(cfg.lora is None or cfg.init_from is not None, "lora", cfg.lora,
         "LoRA adapts an existing model: set init_from=hf:HF_DIR or init_from=ckpt:RUN_DIR")
    need(cfg.objective in OBJECTIVES, "objective", cfg.objective, f"must be one of {OBJECTIVES}")
    dpo = cfg.objective == "dpo"
    need(dpo == (cfg.data.format == "preference"), "data.format", cfg.data.format,
         "objective: dpo trains on preference records (data.format=preference), and preference data needs "
         "objective=dpo" if dpo else "preference data is for objective=dpo")
    if dpo:
        need(cfg.init_from is not None, "objective", cfg.objective,
             "preference tuning starts from a model (usually an SFT run): set init_from=ckpt:RUN or hf:DIR")
        need(cfg.data.path is not None, "data.path", cfg.data.path, "objective=dpo needs preference records")
        need(cfg.dpo.reference != "adapter_off" or cfg.lora is not None, "dpo.reference", cfg.dpo.reference,
             "adapter_off is the base with the LoRA adapters disabled: it needs a lora: section (or use frozen "
             "or precomputed)")
        limit = cfg.dpo.length_limit(cfg.seq_len)
        need(2 * (limit - 1) <= cfg.seq_len, "dpo.max_length", limit,
             f"a pair's two sequences (prompt + chosen, prompt + rejected) share one row of seq_len={cfg.seq_len} "
             f"positions, so dpo.max_length can be at most seq_len // 2 + 1 = {cfg.seq_len // 2 + 1}; raise seq_len")
    model_section(cfg)  # unknown model keys / bad presets fail here


def model_section(cfg: TrainConfig) -> tuple[str | None, dict[str, Any]]:
    """(preset, explicit Phi3Config field overrides) of the `model:` section, validated."""
    section = dict(cfg.model)
    preset = section.pop("preset", None)
    fields = {f.name for f in dataclasses.fields(Phi3Config)}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise TrainConfigError(f"model.{unknown[0]}: unknown key; the model section takes `preset` or a "
                               f"Phi3Config field: {sorted(fields)}")
    if preset is not None:
        from phi3jax.config import PRESETS

        if preset not in PRESETS:
            raise TrainConfigError(f"model.preset={preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
    return preset, section


def build_model_config(preset: str | None, fields: Mapping[str, Any], base: Phi3Config | None = None
                       ) -> Phi3Config:
    """A Phi3Config from a preset (or `base`) plus field overrides; errors name `model.<field>`."""
    try:
        start = base if base is not None else Phi3Config.preset(preset or DEFAULT_CONFIG_NAME)
        return start.replace(**fields) if fields else start
    except (ConfigError, TypeError) as e:
        raise TrainConfigError(f"model: {e}".replace("Phi3Config.", "model.")) from None


# ----------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of a YAML file (or the defaults) with `key=value` overrides applied."""
    data: dict[str, Any] = {}
    name = DEFAULT_CONFIG_NAME
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise TrainConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        data = loaded or {}
        name = os.path.splitext(os.path.basename(path))[0]
    data.setdefault("name", name)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r} must look like key=value (nested keys with dots: "
                                   "optim.learning_rate=1e-3)")
        _set_dotted(data, key.strip(), _parse_value(raw))
    return from_dict(data)


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    cfg = _build(TrainConfig, data, "")
    _check_ranges(cfg)
    return cfg


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for k, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TrainConfigError(f"{'.'.join(parts[: k + 1])} is not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str, default: Any = None) -> Any:
    """An instance of dataclass `cls` from a mapping; keys not given keep `default`'s values (a section's
    own default, e.g. the tiny recipe's optimiser), else the class defaults."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise TrainConfigError(f"{prefix}{unknown[0]}: unknown config key; valid keys here: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        field_default = getattr(default, key, None) if default is not None else _field_default(fields[key])
        kwargs[key] = _coerce(hints[key], value, prefix + key, field_default)
    if default is not None:
        kwargs = {**{name: getattr(default, name) for name in fields}, **kwargs}
    try:
        return cls(**kwargs)
    except ValueError as e:  # OptimConfig's own range checks name `optim.<field>`
        raise TrainConfigError(str(e)) from None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _coerce(hint: Any, value: Any, key: str, default: Any = None) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", default if dataclasses.is_dataclass(default) else None)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: expected {_describe(hint)}")
    if origin is dict or hint is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TrainConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(f"{key}={value!r}: expected a string")
    return value


def _describe(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in typing.get_args(hint)]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
