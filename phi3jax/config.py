"""Phi3Config: one frozen, hashable description of a Phi-3 family model.

The fields mirror Hugging Face's `Phi3Config` (config.json) plus a few runtime choices
(`dtype`, `param_dtype`, `attention_impl`, `remat_policy`). It is validated once, at
construction, and is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from phi3jax import _rope_factors

ROPE_TYPES = ("default", "longrope")
# Legacy names that Phi-3 checkpoints on the hub used for LongRoPE.
LEGACY_LONGROPE_NAMES = ("su", "yarn", "longrope")
# Attention backends by name (phi3jax.ops.attention says what each runs and picks one for `auto`).
ATTENTION_IMPLS = ("auto", "xla", "cpu", "pallas", "splash", "cudnn")
# Floating dtypes for parameters, activations and stored checkpoints.
DTYPES = ("float32", "bfloat16", "float16")
# Phi3Config fields that are runtime choices, not architecture: a checkpoint may be run with others.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy")
# Activation rematerialisation of each layer (phi3jax.model maps the names to JAX's policies).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
# LoRA targets, named after Hugging Face's Phi-3 modules (qkv_proj, o_proj, gate_up_proj, down_proj).
LORA_TARGETS = ("qkv", "o", "gate_up", "down")
# How LoRA's frozen base projections are stored: a float dtype, or quantized (phi3jax.ops.quant).
LORA_BASE_DTYPES = ("bfloat16", "float32", "int8", "nf4")

# config.json keys that we read (or knowingly ignore); anything else is reported.
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "attention_dropout", "resid_pdrop", "embd_pdrop", "attention_bias",
    "hidden_act", "head_dim", "_name_or_path", "initializer_range", "output_attentions",
    "output_hidden_states", "return_dict", "pretraining_tp", "lm_head_bias", "mlp_bias",
    "full_attn_mod", "interpolate_factor", "layer_types",
}


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid Phi-3 model."""


@dataclasses.dataclass(frozen=True)
class Phi3Config:
    """Architecture and runtime settings of a Phi-3 family model.

    Lists from config.json (LongRoPE factors, eos ids) are stored as tuples so the
    config stays hashable. `head_dim` is derived (hidden_size // num_attention_heads),
    as in every released Phi-3 model and in Hugging Face's implementation.
    """

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_factor: float | None = None  # explicit `factor`; else max_pos / original_max_pos
    rope_attention_factor: float | None = None  # explicit `attention_factor`; else the LongRoPE formula
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (32000,)
    pad_token_id: int | None = 32000
    initializer_range: float = 0.02
    # Runtime choices (not part of config.json).
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # dtype parameters are stored in
    attention_impl: str = "auto"
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        # Normalise list-valued fields so the config is hashable however it was built.
        for name in ("rope_short_factor", "rope_long_factor"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        eos = self.eos_token_id
        if eos is None:
            eos = ()
        elif isinstance(eos, int):
            eos = (eos,)
        object.__setattr__(self, "eos_token_id", tuple(int(e) for e in eos))
        if self.rope_type in LEGACY_LONGROPE_NAMES:
            object.__setattr__(self, "rope_type", "longrope")
        self._validate()

    # ----------------------------------------------------------------- validation
    def _validate(self) -> None:
        def fail(field: str, problem: str, fix: str) -> None:
            raise ConfigError(f"Phi3Config.{field}: {problem}. {fix}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                      "original_max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, f"must be a positive integer, got {value!r}", "Set it to a positive int.")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size "
                 f"{self.hidden_size}", "Choose a head count that divides hidden_size.")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                 f"num_attention_heads {self.num_attention_heads}",
                 "GQA shares each kv head among an equal number of query heads.")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}",
                 "Use 1.0 for full rotary embeddings.")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            fail("partial_rotary_factor", f"gives rotary_dim {self.rotary_dim} (head_dim "
                 f"{self.head_dim}), which must be even and > 0", "Pick a factor giving an even dim.")
        if self.rope_type not in ROPE_TYPES:
            fail("rope_type", f"unknown rope type {self.rope_type!r}",
                 f"Phi-3 models use one of {ROPE_TYPES} (legacy 'su'/'yarn' mean 'longrope').")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta}", "Phi-3 uses 10000.0.")
        if self.rope_type == "longrope":
            for field in ("rope_short_factor", "rope_long_factor"):
                value = getattr(self, field)
                if value is None:
                    fail(field, "is required when rope_type is 'longrope'",
                         "Copy short_factor/long_factor from the checkpoint's rope_scaling.")
                if len(value) != self.rotary_dim // 2:
                    fail(field, f"has {len(value)} entries, expected rotary_dim // 2 = "
                         f"{self.rotary_dim // 2}", "One factor per rotary frequency.")
                if any(not math.isfinite(v) or v <= 0 for v in value):
                    fail(field, "must hold positive finite numbers", "Check the rope_scaling values.")
        elif self.rope_short_factor is not None or self.rope_long_factor is not None:
            fail("rope_type", "is 'default' but LongRoPE factors were given",
                 "Set rope_type='longrope' or drop the factors.")
        if self.original_max_position_embeddings > self.max_position_embeddings:
            fail("original_max_position_embeddings",
                 f"{self.original_max_position_embeddings} exceeds max_position_embeddings "
                 f"{self.max_position_embeddings}", "The original context cannot exceed the extended one.")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            fail("sliding_window", f"must be a positive int or None, got {self.sliding_window!r}",
                 "Use None for full causal attention.")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}", "Phi-3 uses 1e-5.")
        for field in ("bos_token_id", "pad_token_id"):
            value = getattr(self, field)
            if value is not None and not 0 <= value < self.vocab_size:
                fail(field, f"{value} is outside the vocabulary [0, {self.vocab_size})",
                     "Special token ids must be valid vocabulary ids.")
        for eos in self.eos_token_id:
            if not 0 <= eos < self.vocab_size:
                fail("eos_token_id", f"{eos} is outside the vocabulary [0, {self.vocab_size})",
                     "Special token ids must be valid vocabulary ids.")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                fail(field, f"unknown dtype {getattr(self, field)!r}", f"Use one of {DTYPES}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"unknown implementation {self.attention_impl!r}",
                 f"Use one of {ATTENTION_IMPLS}.")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"unknown policy {self.remat_policy!r}", f"Use one of {REMAT_POLICIES}.")

    # ------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_scaling_factor(self) -> float:
        if self.rope_factor is not None:
            return self.rope_factor
        return self.max_position_embeddings / self.original_max_position_embeddings

    @property
    def rope_attention_scaling(self) -> float:
        """Multiplier of cos/sin: LongRoPE's attention factor (1.0 for default RoPE)."""
        if self.rope_type != "longrope":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        factor = self.rope_scaling_factor
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    def num_params(self) -> int:
        """Exact parameter count, as Hugging Face counts it (tied embeddings once)."""
        d, i, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        attn = d * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        attn += self.num_attention_heads * self.head_dim * d
        per_layer = attn + 3 * d * i + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return embed + l * per_layer + d + head

    def replace(self, **changes: Any) -> Phi3Config:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"Phi3Config has no field(s) {sorted(unknown)}; "
                              f"valid fields: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Phi3Config:
        """A named preset (see `PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

    # --------------------------------------------------------- HF config.json
    @classmethod
    def from_hf(cls, path: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> Phi3Config:
        """Read a Hugging Face config.json (a file, its directory, or the parsed dict).

        Accepts both forms found in the wild: the legacy one (`rope_scaling` with type
        `su`/`yarn`/`longrope`, `rope_theta` and `original_max_position_embeddings` at the
        top level) and the `rope_parameters` form written by transformers 5.
        """
        if isinstance(path, Mapping):
            raw, where = dict(path), "config dict"
        else:
            path = os.fspath(path)
            file = os.path.join(path, "config.json") if os.path.isdir(path) else path
            if not os.path.isfile(file):
                raise FileNotFoundError(
                    f"no config.json at {file!r}: a Hugging Face model directory needs config.json "
                    "next to its *.safetensors files")
            with open(file, encoding="utf-8") as f:
                try:
                    raw = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{file}: not valid JSON ({e})") from None
            where = file
        return cls(**{**_fields_from_hf(raw, where), **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dict transformers loads (both 4.x and 5.x read this form)."""
        out: dict[str, Any] = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "use_cache": True,
        }
        rope: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        if self.rope_type == "longrope":
            rope["type"] = "longrope"
            rope["short_factor"] = list(self.rope_short_factor)
            rope["long_factor"] = list(self.rope_long_factor)
            rope["original_max_position_embeddings"] = self.original_max_position_embeddings
            if self.rope_factor is not None:
                rope["factor"] = self.rope_factor
            if self.rope_attention_factor is not None:
                rope["attention_factor"] = self.rope_attention_factor
        out["rope_parameters"] = rope
        return out


def _fields_from_hf(raw: dict[str, Any], where: str) -> dict[str, Any]:
    model_type = raw.get("model_type", "phi3")
    if model_type != "phi3":
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported; phi3jax implements model_type "
            "'phi3' (Phi-3/3.5-mini, Phi-3-medium, Phi-4-mini). Phi-3-small ('phi3small') is a "
            "different architecture.")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Phi-3 uses 'silu').")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ConfigError(f"{where}: {key}=true is not supported (Phi-3 has no biases).")

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    fields: dict[str, Any] = {k: raw[k] for k in required}
    fields["num_key_value_heads"] = raw.get("num_key_value_heads") or raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != raw["hidden_size"] // raw["num_attention_heads"]:
        raise ConfigError(f"{where}: head_dim {head_dim} differs from hidden_size // num_attention_heads; "
                          "Phi-3 (and Hugging Face's Phi3 implementation) derive head_dim.")
    max_pos = raw.get("max_position_embeddings", 4096)
    fields["max_position_embeddings"] = max_pos
    for key in ("rms_norm_eps", "sliding_window", "tie_word_embeddings", "bos_token_id",
                "pad_token_id", "initializer_range"):
        if key in raw:
            fields[key] = raw[key]
    if "eos_token_id" in raw:
        fields["eos_token_id"] = raw["eos_token_id"]

    # RoPE: the transformers-5 `rope_parameters` dict, else the legacy `rope_scaling` dict.
    # Top-level rope_theta / partial_rotary_factor / original_max_position_embeddings are the
    # legacy spelling; transformers gives the top-level original_max_position_embeddings priority.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise ConfigError(f"{where}: rope_parameters/rope_scaling must be a dict, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in LEGACY_LONGROPE_NAMES:
        rope_type = "longrope"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: unknown rope type {rope_type!r}; Phi-3 checkpoints use "
                          "'default' or 'longrope' (legacy 'su'/'yarn').")
    fields["rope_type"] = rope_type
    fields["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    fields["partial_rotary_factor"] = float(
        rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    orig = raw.get("original_max_position_embeddings",
                   rope.get("original_max_position_embeddings", max_pos))
    fields["original_max_position_embeddings"] = orig
    if rope_type == "longrope":
        for ours, theirs in (("rope_short_factor", "short_factor"), ("rope_long_factor", "long_factor")):
            if theirs not in rope:
                raise ConfigError(f"{where}: LongRoPE config lacks rope_scaling.{theirs}")
            fields[ours] = rope[theirs]
        if rope.get("factor") is not None:
            fields["rope_factor"] = float(rope["factor"])
        if rope.get("attention_factor") is not None:
            fields["rope_attention_factor"] = float(rope["attention_factor"])
        for key in ("short_mscale", "long_mscale"):
            if rope.get(key) not in (None, 1.0, 1):
                raise ConfigError(f"{where}: rope_scaling.{key}={rope[key]} is not supported; "
                                  "Hugging Face's Phi-3 ignores it and so must a faithful port.")
    return fields


def _longrope(short: Sequence[float], long: Sequence[float], **kw: Any) -> Phi3Config:
    return Phi3Config(rope_type="longrope", rope_short_factor=tuple(short),
                      rope_long_factor=tuple(long), **kw)


_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, bos_token_id=1, eos_token_id=(32000,),
             pad_token_id=32000)
_MEDIUM = dict(_MINI, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
               num_attention_heads=40, num_key_value_heads=10)

PRESETS: dict[str, Phi3Config] = {
    "phi-3-mini-4k": Phi3Config(**_MINI, max_position_embeddings=4096,
                                original_max_position_embeddings=4096, sliding_window=2047),
    "phi-3-mini-128k": _longrope(*_rope_factors.PHI3_MINI_128K, **_MINI, max_position_embeddings=131072,
                                 original_max_position_embeddings=4096, sliding_window=262144),
    "phi-3.5-mini": _longrope(*_rope_factors.PHI35_MINI, **_MINI, max_position_embeddings=131072,
                              original_max_position_embeddings=4096, sliding_window=262144),
    "phi-3-medium-4k": Phi3Config(**_MEDIUM, max_position_embeddings=4096,
                                  original_max_position_embeddings=4096, sliding_window=2047),
    "phi-3-medium-128k": _longrope(*_rope_factors.PHI3_MEDIUM_128K, **{**_MEDIUM, "pad_token_id": None},
                                   max_position_embeddings=131072, original_max_position_embeddings=4096,
                                   sliding_window=131072),
    "phi-4-mini": _longrope(*_rope_factors.PHI4_MINI, vocab_size=200064, hidden_size=3072,
                            intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
                            num_key_value_heads=8, partial_rotary_factor=0.75, tie_word_embeddings=True,
                            max_position_embeddings=131072, original_max_position_embeddings=4096,
                            sliding_window=262144, bos_token_id=199999, eos_token_id=(199999,),
                            pad_token_id=199999),
    # A CPU-sized model: trains in minutes on two cores. GQA (4 query heads share 2 kv heads)
    # so the default path exercises grouped attention. vocab_size follows the tokenizer in train.py.
    "tiny": Phi3Config(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       original_max_position_embeddings=2048, sliding_window=None, bos_token_id=1,
                       eos_token_id=(2,), pad_token_id=0),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the projections: y = x W + (alpha / rank) * dropout(x) A B.

    As PEFT: A starts uniform(+-1/sqrt(fan_in)) and B at zero, so training starts at the base model.
    `targets` names HF's Phi-3 modules without `_proj`; `base_dtype` is how the frozen projection
    weights are stored (`int8` / `nf4`: QLoRA, dequantized inside each layer). Hashable, so it can
    be a static argument of `jax.jit`.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    base_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not isinstance(targets, (list, tuple)):
            raise ConfigError(f"lora.targets={targets!r}: must be a list (or comma-separated names) out of "
                              f"{LORA_TARGETS}")
        object.__setattr__(self, "targets", tuple(targets))
        checks = [
            ("rank", isinstance(self.rank, int) and self.rank >= 1, "must be a positive integer"),
            ("alpha", self.alpha > 0, "must be > 0 (the adapters are scaled by alpha / rank)"),
            ("dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)"),
            ("targets", bool(self.targets) and set(self.targets) <= set(LORA_TARGETS)
             and len(set(self.targets)) == len(self.targets), f"must be distinct names out of {LORA_TARGETS}"),
            ("base_dtype", self.base_dtype in LORA_BASE_DTYPES, f"must be one of {LORA_BASE_DTYPES}"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"lora.{name}={getattr(self, name)!r}: {what}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def quantized(self) -> bool:
        return self.base_dtype in ("int8", "nf4")
