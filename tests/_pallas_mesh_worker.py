"""Run by test_attention_impl.py in a subprocess: the model on 8 host CPU devices (the device
count must be set before JAX starts). Prints one JSON line of max differences pallas vs xla."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from phi3jax import model, parallel  # noqa: E402
from phi3jax.config import Phi3Config  # noqa: E402


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    cfg = Phi3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     original_max_position_embeddings=512, sliding_window=24, bos_token_id=1, eos_token_id=(2,),
                     pad_token_id=0)
    params = model.init_params(cfg, 0)
    tokens = jax.random.randint(jax.random.key(1), (4, 40), 0, 256)
    segments = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 4, axis=0), jnp.int32)

    def loss(params, cfg, mesh):
        logits = model.logits_fn(params, cfg, tokens, segment_ids=segments, mesh=mesh)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (loss_x, logits_x), grads_x = grad_fn(params, cfg, None)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})  # batch over (data, fsdp), heads over tensor
    pallas = cfg.replace(attention_impl="pallas")
    sharded = jax.device_put(params, model.param_shardings(cfg, mesh))
    (loss_p, logits_p), grads_p = grad_fn(sharded, pallas, mesh)
    jaxpr = str(jax.make_jaxpr(lambda p: loss(p, pallas, mesh))(sharded))
    grad_err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                   for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x), strict=True))
    print(json.dumps({
        "devices": len(jax.devices()),
        "logits_max_abs_diff": float(jnp.max(jnp.abs(logits_p - logits_x))),
        "loss_diff": abs(float(loss_p - loss_x)),
        "grad_max_rel_diff": grad_err,
        "kernel_inside_shard_map": "shard_map" in jaxpr and "pallas_call" in jaxpr,
        "grads_sharded": any(len(g.sharding.device_set) == 8 for g in jax.tree.leaves(grads_p)),
    }))


if __name__ == "__main__":
    main()
