"""Multi-device work for the scale-out tests, run in a fresh process (see tests/test_scale_multidevice.py).

JAX reads the host device count once, when its CPU backend starts, so every mode runs in its
own process with XLA_FLAGS set by the caller. Each mode writes its measurements as JSON; the
tests assert on them.

    python tests/scale_worker.py meshes OUT.json           5 steps on every mesh; shardings; bytes
    python tests/scale_worker.py ring OUT.json              ring attention vs unsharded attention
    python tests/scale_worker.py restore OUT.json RUN_DIR [MULTIHOST_CKPT]
    python tests/scale_worker.py multihost OUT.json PROC PORT CKPT_DIR [HF_DIR]
    python tests/scale_worker.py hfload OUT.json HF_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STEPS, BATCH, SEQ = 5, 8, 16
# Every mesh the issue lists; "single" is one device through the same sharded path.
MESHES = {
    "single": {"data": 1, "fsdp": 1},
    "data8": {"data": 8, "fsdp": 1},
    "fsdp8": {"fsdp": 8},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp2_sequence4": {"fsdp": 2, "sequence": 4},
}


def tiny_config():
    from phi3jax.config import Phi3Config

    # GQA (4 query heads, 2 kv heads) so tensor=2 splits kv heads too; float32 throughout.
    return Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      original_max_position_embeddings=64, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)


def optimizer():
    from phi3jax.train.step import OptimConfig, make_optimizer

    return make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), STEPS)


def batches() -> list[dict[str, np.ndarray]]:
    """Five global batches with packed documents and padding (segment 0), identical in every process."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        toks = rng.integers(3, 128, size=(BATCH, SEQ + 1))
        seg = np.ones((BATCH, SEQ), np.int32)
        seg[1, 10:] = 2
        seg[5, 6:] = 2
        seg[2, 12:] = 0
        pos = np.where(seg == 2, np.arange(SEQ) - np.argmax(seg == 2, axis=1)[:, None], np.arange(SEQ))
        pos = np.where(seg == 0, 0, pos)
        out.append(dict(inputs=toks[:, :-1].astype(np.int32), targets=toks[:, 1:].astype(np.int32),
                        loss_mask=(seg > 0).astype(np.float32), segment_ids=seg, positions=pos.astype(np.int32)))
    return out


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def sharding_report(tree) -> dict[str, dict]:
    import jax

    report = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        report[path_str(path)] = {"spec": [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec],
                                  "shard": list(leaf.addressable_shards[0].data.shape), "shape": list(leaf.shape)}
    return report


def train_on(mesh_axes: dict, devices=None, put=None, accum_steps: int = 1):
    import jax

    from phi3jax import parallel
    from phi3jax.train import state as state_lib

    cfg, opt = tiny_config(), optimizer()
    mesh = parallel.make_mesh(mesh_axes, devices=devices)
    state = state_lib.sharded_init(cfg, mesh, opt, 0)
    init_report = sharding_report(state)
    init_bytes = parallel.device_bytes((state.params, state.opt_state), jax.local_devices()[0])
    step = state_lib.make_train_step(cfg, mesh, opt, accum_steps=accum_steps)
    losses = []
    for batch in batches():
        state, metrics = step(state, (put or parallel.put_batch)(batch, mesh))
        losses.append(float(metrics["loss"]))
    return mesh, state, losses, init_report, init_bytes


def mode_meshes(out: str) -> None:
    import jax

    from phi3jax import parallel
    from phi3jax.model import init_params
    from phi3jax.train import state as state_lib
    from phi3jax.train.step import init_train_state, train_step

    cfg, opt = tiny_config(), optimizer()
    result = {"timings": {}}
    t0 = time.time()
    state = init_train_state(init_params(cfg, 0), opt)  # the plain, unsharded path
    step = jax.jit(lambda s, b: train_step(s, b, cfg, opt))
    ref = []
    for batch in batches():
        state, metrics = step(state, batch)
        ref.append(float(metrics["loss"]))
    result["reference"] = ref
    result["timings"]["reference"] = time.time() - t0
    result["losses"], result["bytes"] = {}, {}
    for name, axes in MESHES.items():
        t0 = time.time()
        devices = jax.devices()[:1] if name == "single" else None
        mesh, state, losses, report, nbytes = train_on(axes, devices)
        result["losses"][name] = losses
        result["bytes"][name] = nbytes
        result["timings"][name] = time.time() - t0
        if name == "fsdp2_sequence4":  # evaluation under the mesh (ring attention) vs one device
            from phi3jax.train.step import loss_sums

            batch = batches()[0]
            sharded = state_lib.make_eval_step(cfg, mesh)(state.params, parallel.put_batch(batch, mesh))
            host_params = jax.tree.map(np.asarray, state.params)
            plain = jax.jit(lambda p, b: loss_sums(p, cfg, b))(host_params, batch)
            result["eval"] = {"sharded": [float(x) for x in sharded], "plain": [float(x) for x in plain]}
        if name == "fsdp4_tensor2":
            result["shardings"] = report
            result["shardings_after_steps"] = sharding_report(state)
    # Gradient accumulation under a mesh: 2 micro-batches of 4 rows on fsdp=4 x tensor=2.
    t0 = time.time()
    result["losses"]["fsdp4_tensor2_accum2"] = train_on(MESHES["fsdp4_tensor2"], accum_steps=2)[2]
    result["timings"]["fsdp4_tensor2_accum2"] = time.time() - t0
    # Per-device bytes as fsdp grows (data takes the rest of the 8 devices).
    result["fsdp_bytes"] = {}
    for fsdp in (1, 2, 4, 8):
        mesh = parallel.make_mesh({"data": 8 // fsdp, "fsdp": fsdp})
        state = state_lib.sharded_init(cfg, mesh, opt, 0)
        result["fsdp_bytes"][fsdp] = {"params": parallel.device_bytes(state.params),
                                      "opt_state": parallel.device_bytes(state.opt_state)}
    result["total_param_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(init_params(cfg, 0))))
    with open(out, "w") as f:
        json.dump(result, f)


def mode_ring(out: str) -> None:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.reference import mha_reference
    from phi3jax import parallel
    from phi3jax.ops.ring_attention import ring_attention

    rng = np.random.default_rng(1)
    b, t = 2, 32
    seg = np.repeat(np.array([[1, 1, 1, 2], [1, 2, 3, 3]]), t // 4, axis=1).astype(np.int32)
    seg[1, -3:] = 0  # padding at the end of a row
    cases = [
        ("fsdp2_seq4_causal", {"fsdp": 2, "sequence": 4}, None, None, 4, 2),
        ("fsdp2_seq4_window5_segments", {"fsdp": 2, "sequence": 4}, 5, seg, 4, 2),
        ("seq8_window12_segments", {"sequence": 8}, 12, seg, 4, 4),
        # 2 kv heads on tensor=4: kv heads are replicated, query heads split.
        ("seq2_tensor4_gqa_replicated_kv", {"sequence": 2, "tensor": 4}, None, seg, 4, 2),
    ]
    result = {}
    for name, axes, window, segment_ids, h, kv in cases:
        mesh = parallel.make_mesh({"fsdp": 1, **axes})
        q = jnp.asarray(rng.normal(size=(b, t, h, 8)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(b, t, kv, 8)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(b, t, kv, 8)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(b, t, h, 8)), jnp.float32)
        sid = None if segment_ids is None else jnp.asarray(segment_ids)

        def ref(q, k, v, sid=sid, window=window):
            return mha_reference(q, k, v, q_segment_ids=sid, causal=True, sliding_window=window)

        def ring(q, k, v, sid=sid, window=window, mesh=mesh, rules=parallel.rules_for(kv, mesh)):
            return ring_attention(q, k, v, mesh=mesh, rules=rules, segment_ids_bt=sid, causal=True,
                                  sliding_window=window)

        got = jax.jit(ring)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v, w=w: jnp.sum(ring(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
        want = ref(q, k, v)
        want_grads = jax.grad(lambda q, k, v, w=w: jnp.sum(ref(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
        result[name] = {"forward": float(jnp.max(jnp.abs(got - want))),
                        "grads": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, want_grads, strict=True)],
                        "out_spec": [list(a) if isinstance(a, tuple) else a for a in got.sharding.spec]}
    result["temp_bytes"] = step_temp_bytes()
    with open(out, "w") as f:
        json.dump(result, f)


def step_temp_bytes() -> dict[str, int]:
    """Compiled temporaries of a train step with 1024 tokens per device: fsdp=8 (8 x 1024) vs
    sequence=8 (1 x 8192). Ring attention keeps the sequence-parallel step's memory O(T/n)."""
    import jax
    import jax.numpy as jnp

    from phi3jax import parallel
    from phi3jax.config import Phi3Config
    from phi3jax.train import state as state_lib
    from phi3jax.train.batch import BATCH_KEYS

    cfg = Phi3Config.preset("tiny", vocab_size=4096, num_hidden_layers=2, remat_policy="full")
    temps = {}
    for name, axes, (b, t) in (("fsdp8", {"fsdp": 8}, (8, 1024)), ("sequence8", {"fsdp": 1, "sequence": 8}, (1, 8192))):
        mesh = parallel.make_mesh(axes)
        state = state_lib.abstract_state(cfg, mesh, optimizer())
        spec = parallel.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=spec)
                 for k in BATCH_KEYS}
        compiled = state_lib.make_train_step(cfg, mesh, optimizer()).lower(state, batch).compile()
        temps[name] = int(compiled.memory_analysis().temp_size_in_bytes)
    return temps


def mode_restore(out: str, run_dir: str, multihost_ckpt: str | None = None) -> None:
    import jax
    import orbax.checkpoint as ocp

    from phi3jax import parallel
    from phi3jax.model import param_shardings
    from phi3jax.train import checkpoint as ckpt
    from phi3jax.train import state as state_lib

    cfg, opt = tiny_config(), optimizer()
    result = {}
    # Train 2 steps on fsdp=8 so the optimiser state is not all zeros, then save.
    mesh8, state, _, _, _ = train_on(MESHES["fsdp8"])
    with ckpt.checkpoint_manager(run_dir, async_save=False) as manager:
        manager.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                                opt_state=ocp.args.StandardSave(state.opt_state)))
        manager.wait_until_finished()
    # Restore onto fsdp=4 x tensor=2.
    mesh42 = parallel.make_mesh(MESHES["fsdp4_tensor2"])
    target = state_lib.state_shardings(cfg, mesh42, opt)
    params = ckpt.restore_params(run_dir, 2, cfg, shardings=target.params)
    abstract = state_lib.abstract_state(cfg, mesh42, opt)
    with ckpt.checkpoint_manager(run_dir, async_save=False) as manager:
        _, opt_state, _ = ckpt.restore_train_state(manager, 2, abstract.params, abstract.opt_state)
    result["params_equal"] = all(bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
                                 zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True))
    result["opt_state_equal"] = all(bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
                                    zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(opt_state), strict=True))
    result["restored_shardings"] = sharding_report(params)
    result["restored_match_target"] = all(
        a.sharding.is_equivalent_to(s, a.ndim) for a, s in
        zip(jax.tree.leaves(params) + jax.tree.leaves(opt_state),
            jax.tree.leaves(target.params) + jax.tree.leaves(target.opt_state), strict=True))
    if multihost_ckpt:
        ref = np.load(multihost_ckpt + ".npz")  # what the saving processes held
        restored = ckpt.restore_params(multihost_ckpt, STEPS, cfg, shardings=param_shardings(cfg, mesh8))
        result["multihost_ckpt_equal"] = {
            path_str(p): bool(np.array_equal(np.asarray(x), ref[path_str(p)]))
            for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    with open(out, "w") as f:
        json.dump(result, f)


def mode_multihost(out: str, proc: str, port: str, ckpt_dir: str, hf_dir: str | None = None) -> None:
    from phi3jax import parallel

    parallel.initialize_distributed({"coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                     "process_id": int(proc)})
    import jax
    import orbax.checkpoint as ocp

    from phi3jax.train import checkpoint as ckpt

    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_devices": jax.local_device_count(), "devices": jax.device_count()}

    def put_own_rows(batch, mesh):
        # Per-process loading: this process reads only the rows its devices hold.
        rows = parallel.process_batch_rows(mesh, BATCH)
        result.setdefault("rows", rows.tolist())
        return parallel.put_batch({k: v[rows] for k, v in batch.items()}, mesh, BATCH)

    mesh, state, losses, _, _ = train_on(MESHES["fsdp4_tensor2"], put=put_own_rows)
    result["losses"] = losses
    with ckpt.checkpoint_manager(ckpt_dir, async_save=False) as manager:  # every process joins the save
        manager.save(STEPS, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params)))
        manager.wait_until_finished()
    # What the processes hold, gathered whole, for the restore to compare with bit for bit.
    from jax.experimental import multihost_utils

    held = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        np.savez(ckpt_dir + ".npz", **{path_str(p): np.asarray(x) for p, x in
                                       jax.tree_util.tree_flatten_with_path(held)[0]})
    if hf_dir:
        from phi3jax.convert.hf import load_hf
        from phi3jax.convert.safetensors import SafetensorsReader

        reader_bytes = []
        original = SafetensorsReader.get_block

        def counting(self, *args):
            block = original(self, *args)
            reader_bytes.append(block.nbytes)
            return block

        SafetensorsReader.get_block = counting
        cfg, params = load_hf(hf_dir, mesh=mesh)
        result["hf_bytes_read"] = int(sum(reader_bytes))
        result["hf_total_bytes"] = int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
    with open(out, "w") as f:
        json.dump(result, f)


def mode_hfload(out: str, hf_dir: str) -> None:
    import jax

    from phi3jax import parallel
    from phi3jax.convert.hf import load_hf
    from phi3jax.convert.safetensors import SafetensorsReader
    from phi3jax.model import param_shardings

    cfg, full = load_hf(hf_dir)
    result = {}
    original_get = SafetensorsReader.get

    def forbidden(self, name):
        raise AssertionError(f"sharded loading read the whole tensor {name}")

    for name, axes in (("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}), ("fsdp2_tensor4", {"fsdp": 2, "tensor": 4})):
        mesh = parallel.make_mesh(axes)
        SafetensorsReader.get = forbidden
        try:
            _, params = load_hf(hf_dir, mesh=mesh)
        finally:
            SafetensorsReader.get = original_get
        expected = param_shardings(cfg, mesh)
        result[name] = {
            "equal": all(bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
                         zip(jax.tree.leaves(full), jax.tree.leaves(params), strict=True)),
            "shardings_match": all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
                                   zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True)),
            "shardings": sharding_report(params),
        }
    with open(out, "w") as f:
        json.dump(result, f)


LORA_MESHES = ("fsdp8", "fsdp4_tensor2", "data2_fsdp2_tensor2", "fsdp2_sequence4")


def mode_lora(out: str) -> None:
    """QLoRA (nf4 base, dropout 0.1, rank 4 on every projection): five steps unsharded on one device,
    then on each of LORA_MESHES, with the base and the adapters laid out by their rules."""
    import jax

    from phi3jax import lora as lora_lib
    from phi3jax import parallel
    from phi3jax.config import LoraConfig
    from phi3jax.model import init_params
    from phi3jax.train import state as state_lib
    from phi3jax.train.step import init_train_state, train_step

    # hidden 256: four nf4 blocks of 64 along embed, so fsdp=4 splits the quantized base too.
    cfg, opt = tiny_config().replace(hidden_size=256, intermediate_size=256), optimizer()
    lora = LoraConfig(rank=4, alpha=8, dropout=0.1, base_dtype="nf4")
    base = lora_lib.quantize_base(init_params(cfg, 0), cfg, lora)
    state = init_train_state(lora_lib.init_adapters(cfg, lora, 0), opt)
    step = jax.jit(lambda s, b, f: train_step(s, b, cfg, opt, frozen=f, lora=lora, seed=3))
    result = {"reference": [], "losses": {}}
    for batch in batches():
        state, metrics = step(state, batch, base)
        result["reference"].append(float(metrics["loss"]))
    for name in LORA_MESHES:
        mesh = parallel.make_mesh(MESHES[name])
        frozen = jax.device_put(base, lora_lib.base_shardings(cfg, lora, mesh))
        state = state_lib.sharded_lora_init(cfg, lora, mesh, opt, 0)
        step = state_lib.make_train_step(cfg, mesh, opt, lora=lora, seed=3)
        losses = []
        for batch in batches():
            state, metrics = step(state, parallel.put_batch(batch, mesh), frozen)
            losses.append(float(metrics["loss"]))
        result["losses"][name] = losses
        if name == "fsdp4_tensor2":
            result["adapters"] = sharding_report(state.params)
            result["base"] = sharding_report(frozen)
    with open(out, "w") as f:
        json.dump(result, f)


DPO_MESHES = {"frozen": ("fsdp4_tensor2", "fsdp2_sequence4"), "precomputed": ("fsdp2_sequence4",)}


def dpo_batches() -> list[dict[str, np.ndarray]]:
    """Five batches of packed preference pairs: segments 2k+1 / 2k+2 are pair k's chosen / rejected
    sequences (a 4-token prompt without loss, then the completion); padding at the end of some rows;
    a precomputed reference value at each sequence's first position."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(STEPS):
        toks = rng.integers(3, 128, size=(BATCH, SEQ))
        seg, pos, mask, ref = (np.zeros((BATCH, SEQ), t) for t in (np.int32, np.int32, np.float32, np.float32))
        for b in range(BATCH):
            cuts = [0, 8, 16] if b % 2 else [0, 4, 8, 12, 15]  # one pair, or two pairs and a padding slot
            for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True), start=1):
                seg[b, lo:hi], pos[b, lo:hi] = s, np.arange(hi - lo)
                mask[b, lo + 2: hi] = 1.0
                ref[b, lo] = -rng.uniform(5, 20)
        out.append(dict(inputs=toks, targets=np.roll(toks, -1, axis=1), loss_mask=mask, segment_ids=seg,
                        positions=pos, ref_logps=ref))
    return out


def mode_dpo(out: str) -> None:
    """DPO (sigmoid, beta 0.5) with a frozen reference (a copy of the starting parameters, sharded
    like them) and with a precomputed one: five steps unsharded on one device, then on its DPO_MESHES."""
    import jax

    from phi3jax import parallel
    from phi3jax.model import init_params
    from phi3jax.train import state as state_lib
    from phi3jax.train.dpo import DpoConfig, dpo_train_step
    from phi3jax.train.step import init_train_state

    cfg, opt = tiny_config(), optimizer()
    params = init_params(cfg, 0)
    result: dict = {"reference": {}, "losses": {}}
    for ref in ("frozen", "precomputed"):
        dpo = DpoConfig(beta=0.5, reference=ref)
        ref_params = params if ref == "frozen" else None
        state = init_train_state(params, opt)
        step = jax.jit(lambda s, b, r, d=dpo: dpo_train_step(s, b, cfg, opt, d, ref_params=r))
        losses = []
        for batch in dpo_batches():
            state, metrics = step(state, batch, ref_params)
            losses.append([float(metrics["loss"]), float(metrics["rewards/margins"]), float(metrics["pairs"])])
        result["reference"][ref] = losses
        for name in DPO_MESHES[ref]:
            mesh = parallel.make_mesh(MESHES[name])
            state = state_lib.sharded_init(cfg, mesh, opt, 0)  # the same values as init_params(cfg, 0)
            refs = None if ref_params is None else jax.device_put(
                params, state_lib.reference_shardings(cfg, mesh, dpo))
            step = state_lib.make_dpo_step(cfg, mesh, opt, dpo)
            losses = []
            for batch in dpo_batches():
                state, metrics = step(state, parallel.put_batch(batch, mesh), None, refs)
                losses.append([float(metrics["loss"]), float(metrics["rewards/margins"]), float(metrics["pairs"])])
            result["losses"][f"{ref}/{name}"] = losses
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"meshes": mode_meshes, "ring": mode_ring, "restore": mode_restore, "multihost": mode_multihost,
     "hfload": mode_hfload, "lora": mode_lora, "dpo": mode_dpo}[mode](*args)
