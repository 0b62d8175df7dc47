"""Phi3Config: presets, validation, and reading/writing Hugging Face config.json in both forms."""

from __future__ import annotations

import json

import jax
import pytest

from phi3jax import ConfigError, Phi3Config
from phi3jax.config import PRESETS
from phi3jax.model import abstract_params, count_params


def test_phi3_mini_parameter_count_matches_hf_to_the_parameter():
    cfg = Phi3Config.preset("phi-3-mini-4k")
    assert cfg.num_params() == 3_821_079_552
    # The model's own (abstract) initialisation agrees, without allocating 15 GB.
    assert count_params(abstract_params(cfg)) == 3_821_079_552


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_and_initialises_abstractly(name):
    cfg = Phi3Config.preset(name)
    assert count_params(abstract_params(cfg)) == cfg.num_params()


def test_presets_match_the_reference_table():
    mini128 = Phi3Config.preset("phi-3-mini-128k")
    assert (mini128.rope_type, mini128.max_position_embeddings, mini128.original_max_position_embeddings) == (
        "longrope", 131072, 4096)
    assert len(mini128.rope_long_factor) == 48 and mini128.sliding_window == 262144
    medium = Phi3Config.preset("phi-3-medium-4k")
    assert (medium.num_attention_heads, medium.num_key_value_heads, medium.head_dim) == (40, 10, 128)
    phi4 = Phi3Config.preset("phi-4-mini")
    assert phi4.rotary_dim == 96 and phi4.tie_word_embeddings and phi4.vocab_size == 200064
    assert abs(mini128.rope_attention_scaling - 1.1902380714238083) < 1e-12


def test_config_is_hashable_and_a_static_jit_argument():
    cfg = Phi3Config.preset("tiny")
    assert hash(cfg) == hash(Phi3Config.preset("tiny"))
    f = jax.jit(lambda x, c: x * c.hidden_size, static_argnums=1)
    assert int(f(2, cfg)) == 2 * cfg.hidden_size


@pytest.mark.parametrize("changes, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(rope_type="dynamic"), "rope_type"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(pad_token_id=10**6), "pad_token_id"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    (dict(dtype="int8"), "dtype"),
    (dict(attention_impl="flash9"), "attention_impl"),
])
def test_invalid_fields_are_named_in_the_error(changes, field):
    with pytest.raises(ConfigError, match=f"Phi3Config.{field}"):
        Phi3Config.preset("tiny").replace(**changes)


def test_longrope_factor_lists_must_have_one_entry_per_frequency():
    with pytest.raises(ConfigError, match="rope_short_factor: has 3 entries, expected rotary_dim // 2 = 32"):
        Phi3Config.preset("tiny").replace(rope_type="longrope", rope_short_factor=(1.0, 1.0, 1.0),
                                          rope_long_factor=(1.0,) * 32)


def test_unknown_field_in_replace_is_an_error():
    with pytest.raises(ConfigError, match="no field"):
        Phi3Config.preset("tiny").replace(hidden=3)


LEGACY_128K = {  # the form the Phi-3-mini-128k repositories shipped
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
    "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-05, "sliding_window": 262144, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 32000, "pad_token_id": 32000, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "su", "short_factor": [1.05] * 48, "long_factor": [1.5] * 48},
}


def test_from_hf_reads_the_legacy_su_form(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LEGACY_128K))
    cfg = Phi3Config.from_hf(tmp_path)
    assert cfg.rope_type == "longrope" and cfg.rope_short_factor == (1.05,) * 48
    assert cfg.original_max_position_embeddings == 4096 and cfg.rope_theta == 10000.0
    assert cfg.eos_token_id == (32000,)


def test_from_hf_reads_the_transformers5_rope_parameters_form_with_explicit_factors():
    raw = {k: v for k, v in LEGACY_128K.items() if k not in ("rope_scaling", "rope_theta")}
    raw["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 250000.0, "short_factor": [1.0] * 48,
                              "long_factor": [2.0] * 48, "factor": 16.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 4096}
    cfg = Phi3Config.from_hf(raw)
    assert cfg.rope_theta == 250000.0
    assert cfg.rope_scaling_factor == 16.0 and cfg.rope_attention_scaling == 1.3


def test_from_hf_top_level_original_max_position_wins_as_in_transformers():
    raw = dict(LEGACY_128K, original_max_position_embeddings=2048)
    raw["rope_scaling"] = dict(raw["rope_scaling"], original_max_position_embeddings=4096)
    assert Phi3Config.from_hf(raw).original_max_position_embeddings == 2048


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unknown rope type 'dynamic'"),
    ({"model_type": "phi3small"}, "model_type 'phi3small' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 48}}, "lacks rope_scaling.long_factor"),
])
def test_from_hf_rejects_what_it_cannot_represent(changes, message):
    with pytest.raises(ConfigError, match=message):
        Phi3Config.from_hf({**LEGACY_128K, **changes})


def test_from_hf_without_config_json_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Phi3Config.from_hf(tmp_path)


@pytest.mark.parametrize("name", ["phi-3-mini-4k", "phi-3.5-mini", "phi-4-mini", "phi-3-medium-128k"])
def test_to_hf_dict_round_trips_and_transformers_reads_the_same_rope(name):
    transformers = pytest.importorskip("transformers")
    cfg = Phi3Config.preset(name)
    hf_dict = cfg.to_hf_dict()
    assert Phi3Config.from_hf(hf_dict) == cfg
    hf = transformers.Phi3Config(**hf_dict)
    assert hf.rope_parameters["rope_type"] == cfg.rope_type
    assert hf.rope_parameters.get("partial_rotary_factor", 1.0) == cfg.partial_rotary_factor
    assert hf.original_max_position_embeddings == cfg.original_max_position_embeddings
