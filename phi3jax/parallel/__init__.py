"""Parallel layer: logical axis names and rules (data), the mesh, and multi-process start-up.

Nothing here imports the model, the trainer or the converters; they all import from here.
"""

from phi3jax.parallel.axes import LOGICAL_RULES, MESH_AXES, Rules, constrain, mesh_axes, rules_for, spec
from phi3jax.parallel.distributed import (
    DistributedConfig,
    broadcast_flag,
    gather_json,
    initialize_distributed,
    is_main_process,
)
from phi3jax.parallel.mesh import (
    MeshConfig,
    MeshError,
    batch_sharding,
    check_batch_fits_mesh,
    check_model_fits_mesh,
    describe_mesh,
    device_bytes,
    make_mesh,
    process_batch_rows,
    put_batch,
    sharded_bytes_per_device,
)

__all__ = ["LOGICAL_RULES", "MESH_AXES", "DistributedConfig", "MeshConfig", "MeshError", "Rules", "batch_sharding",
           "broadcast_flag", "check_batch_fits_mesh", "check_model_fits_mesh", "constrain", "describe_mesh",
           "device_bytes", "gather_json", "initialize_distributed", "is_main_process", "make_mesh", "mesh_axes",
           "process_batch_rows", "put_batch", "rules_for", "sharded_bytes_per_device", "spec"]
