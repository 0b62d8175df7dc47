"""The mesh config, the logical-axis rules and their errors: no devices needed.

Rules are checked on `jax.sharding.AbstractMesh`es (shapes without devices), so a 256-chip
layout is testable in this process; placement on real (host) devices is in
test_scale_multidevice.py.
"""

from __future__ import annotations

import jax
import pytest
from jax.sharding import AbstractMesh

from phi3jax import parallel as sharding
from phi3jax.config import Phi3Config
from phi3jax.model import param_shardings
from phi3jax.parallel import MeshConfig, MeshError


def abstract_mesh(**axes: int) -> AbstractMesh:
    sizes = {"data": 1, "fsdp": 1, "sequence": 1, "tensor": 1, **axes}
    return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


def param_specs(cfg: Phi3Config, mesh: AbstractMesh):
    """Every parameter's PartitionSpec on a mesh of shapes only."""
    return jax.tree.map(lambda s: s.spec, param_shardings(cfg, mesh))


# ------------------------------------------------------------------------------ mesh config
@pytest.mark.parametrize("devices", [1, 8, 256])
def test_default_mesh_puts_every_device_on_fsdp(devices):
    assert MeshConfig().resolve(devices) == {"data": 1, "fsdp": devices, "sequence": 1, "tensor": 1}


def test_minus_one_takes_the_remaining_devices():
    assert MeshConfig(data=2, fsdp=-1, tensor=4).resolve(64) == {"data": 2, "fsdp": 8, "sequence": 1, "tensor": 4}


def test_slices_multiply_the_data_axis_over_dcn():
    # 2 slices of 16 chips: data crosses slices (DCN), fsdp x tensor stay inside a slice (ICI).
    assert MeshConfig(fsdp=-1, tensor=4).resolve(32, num_slices=2) == {
        "data": 2, "fsdp": 4, "sequence": 1, "tensor": 4}


def test_mesh_whose_product_does_not_match_the_devices_is_a_clear_error():
    with pytest.raises(MeshError, match=r"data=3 x fsdp=3 x sequence=1 x tensor=1 = 9 devices, but there are "
                                        r"8 devices.*set one axis to -1"):
        MeshConfig(data=3, fsdp=3).resolve(8)


def test_make_mesh_on_this_process_rejects_a_mesh_larger_than_its_devices():
    with pytest.raises(MeshError, match="= 1024 devices"):
        sharding.make_mesh({"fsdp": 1024})


def test_remaining_axis_that_cannot_divide_is_an_error():
    with pytest.raises(MeshError, match="multiply to 3, which does not divide the 8 devices"):
        MeshConfig(tensor=3).resolve(8)


def test_only_one_axis_may_be_minus_one():
    with pytest.raises(MeshError, match="only one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


@pytest.mark.parametrize("bad", [{"fsdp": 0}, {"tensor": -2}, {"pipeline": 2}, {"fsdp": "four"}])
def test_bad_axis_values_are_rejected(bad):
    with pytest.raises(MeshError):
        MeshConfig.from_dict(bad)


def test_parse_the_command_line_form():
    assert MeshConfig.parse("fsdp=16, tensor=4") == MeshConfig(fsdp=16, tensor=4)
    with pytest.raises(MeshError, match="AXIS=SIZE"):
        MeshConfig.parse("fsdp16")


# ------------------------------------------------------------------------------ rules
MINI = Phi3Config.preset("phi-3-mini-4k")


def test_tensor_axis_that_does_not_divide_the_heads_is_a_clear_error():
    with pytest.raises(MeshError, match=r"mesh.tensor=3 does not divide num_attention_heads=32.*1, 2, 4, 8, 16, 32"):
        sharding.check_model_fits_mesh(MINI, abstract_mesh(tensor=3))


def test_fsdp_that_does_not_divide_the_hidden_size_is_a_clear_error():
    with pytest.raises(MeshError, match="fsdp x mesh.sequence = 5 does not divide hidden_size=3072"):
        sharding.check_model_fits_mesh(MINI, abstract_mesh(fsdp=5))


def test_phi3_mini_on_a_v5e_pod_layout():
    specs = param_specs(MINI, abstract_mesh(fsdp=64, tensor=4))
    zero3 = ("fsdp", "sequence")
    assert tuple(specs["layers"]["attn"]["qkv"]) == (None, zero3, None, "tensor", None)
    assert tuple(specs["layers"]["mlp"]["gate_up"]) == (None, zero3, None, "tensor")
    assert tuple(specs["layers"]["attn"]["o"]) == (None, "tensor", None, zero3)
    assert tuple(specs["layers"]["mlp"]["down"]) == (None, "tensor", zero3)
    assert tuple(specs["embed"]) == ("tensor", zero3)
    assert tuple(specs["lm_head"]) == (zero3, "tensor")
    assert tuple(specs["final_norm"]["scale"]) in ((None,), ())


def test_gqa_kv_heads_are_replicated_when_tensor_cannot_split_them():
    medium = Phi3Config.preset("phi-3-medium-4k")  # 40 query heads, 10 kv heads
    specs = param_specs(medium, abstract_mesh(fsdp=2, tensor=4))
    assert tuple(specs["layers"]["attn"]["q"])[2] == "tensor"
    assert tuple(specs["layers"]["attn"]["kv"])[3] is None
    specs = param_specs(medium, abstract_mesh(fsdp=4, tensor=2))  # 10 % 2 == 0: split
    assert tuple(specs["layers"]["attn"]["kv"])[3] == "tensor"


def test_batch_and_sequence_must_divide_their_axes():
    mesh = abstract_mesh(data=2, fsdp=2, sequence=4)
    sharding.check_batch_fits_mesh(8, 64, mesh)
    with pytest.raises(MeshError, match="batch size 6 is not divisible by mesh.data x mesh.fsdp = 4"):
        sharding.check_batch_fits_mesh(6, 64, mesh)
    with pytest.raises(MeshError, match="sequence length 30 is not divisible by mesh.sequence = 4"):
        sharding.check_batch_fits_mesh(8, 30, mesh)


def test_batch_is_split_over_data_and_fsdp_and_length_over_sequence():
    assert tuple(sharding.batch_sharding(abstract_mesh()).spec) == (("data", "fsdp"), "sequence")


# ------------------------------------------------------------------------------ multi-host config
@pytest.mark.parametrize("bad, message", [
    ({"coordinator": "10.0.0.1:1234"}, "give all of"),
    ({"coordinator": "10.0.0.1", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"process_id=2.*\[0, 2\)"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "num_processes=0"),
])
def test_distributed_config_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        sharding.initialize_distributed(bad)


def test_single_process_needs_no_initialisation():
    assert sharding.initialize_distributed(None) is False
