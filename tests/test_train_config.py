"""The training config: YAML + dotted overrides, named sections, every bad key or value named."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from phi3jax.train.config import TrainConfig, TrainConfigError, from_dict, load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def test_no_arguments_is_the_tiny_cpu_recipe_and_configs_tiny_yaml_spells_it_out():
    default = load_config()
    assert default == TrainConfig()
    assert default.model == {"preset": "tiny"} and default.data.path is None
    assert default.resolved_run_dir == "runs/tiny"
    assert load_config(CONFIGS / "tiny.yaml") == default


def test_dotted_overrides_reach_every_section():
    cfg = load_config(None, ["steps=7", "optim.learning_rate=1e-3", "model.preset=phi-3-mini-4k",
                             "model.remat_policy=full", "data.path=corpus/", "mesh.fsdp=4", "mesh.data=2",
                             "distributed.num_processes=2", "distributed.process_id=1", "log.every=1",
                             "init_from=hf:some/dir", "keep_checkpoints=null"])
    assert cfg.steps == 7 and cfg.optim.learning_rate == 1e-3  # YAML would read 1e-3 as a string
    assert cfg.model == {"preset": "phi-3-mini-4k", "remat_policy": "full"}
    assert cfg.data.path == "corpus/" and cfg.mesh.fsdp == 4 and cfg.mesh.data == 2
    assert cfg.distributed.num_processes == 2 and cfg.distributed.process_id == 1
    assert cfg.keep_checkpoints is None and cfg.init_from == "hf:some/dir"


def test_mesh_and_distributed_defaults():
    cfg = load_config()
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.sequence) == (1, -1, 1, 1)
    assert (cfg.distributed.coordinator, cfg.distributed.num_processes, cfg.distributed.process_id) == (None,) * 3


def test_run_dir_defaults_to_runs_slash_config_name(tmp_path):
    path = tmp_path / "my_recipe.yaml"
    path.write_text("steps: 3\n")
    assert load_config(path).resolved_run_dir == "runs/my_recipe"
    assert load_config(path, ["run_dir=elsewhere"]).resolved_run_dir == "elsewhere"


@pytest.mark.parametrize("override, named", [
    ("stpes=3", "stpes"),
    ("optim.learning_rat=1", "optim.learning_rat"),
    ("data.formt=text", "data.formt"),
    ("mesh.pipeline=2", "mesh.pipeline"),
    ("distributed.host=x", "distributed.host"),
    ("model.hiden_size=8", "model.hiden_size"),
])
def test_unknown_keys_are_errors_naming_the_key(override, named):
    with pytest.raises(TrainConfigError, match=f"^{named}: unknown"):
        load_config(None, [override])


@pytest.mark.parametrize("override, named", [
    ("steps=many", "steps"),
    ("steps=0", "steps"),
    ("batch_size=2.5", "batch_size"),
    ("optim.learning_rate=fast", "optim.learning_rate"),
    ("optim.learning_rate=-1", "optim.learning_rate"),
    ("log.progress_bar=maybe", "log.progress_bar"),
    ("mesh.fsdp=two", "mesh.fsdp"),
    ("mesh.tensor=0", "mesh.tensor"),
    ("distributed.num_processes=abc", "distributed.num_processes"),
    ("distributed.coordinator=5", "distributed.coordinator"),
    ("data.format=csv", "data.format"),
    ("model.preset=phi-9", "model.preset"),
    ("init_from=somewhere", "init_from"),
    ("optim", "optim"),
])
def test_bad_values_are_errors_naming_the_key(override, named):
    with pytest.raises(TrainConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_batch_must_split_into_accumulation_steps():
    with pytest.raises(TrainConfigError, match="accum_steps"):
        load_config(None, ["batch_size=6", "optim.accum_steps=4"])


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(TrainConfigError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    from phi3jax.train.config import build_model_config, model_section

    preset, fields = model_section(cfg)
    build_model_config(preset, fields)  # the model section describes a valid model


def test_config_round_trips_through_yaml():
    cfg = load_config(None, ["steps=9", "model.hidden_size=64", "optim.accum_steps=2"])
    assert from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_overriding_one_key_of_a_section_keeps_the_recipes_other_values():
    default = load_config()
    cfg = load_config(None, ["optim.learning_rate=5e-3", "log.every=1"])
    assert cfg.optim == dataclasses.replace(default.optim, learning_rate=5e-3)
    assert cfg.log == dataclasses.replace(default.log, every=1)
