"""`phi3jax plan`: the real train step compiled for a TPU topology on this CPU machine (libtpu).

The full-size Phi-3-mini compile runs in a subprocess (it loads libtpu's compiler; tens of
seconds) and is checked against arithmetic from the parameter count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phi3jax.cli import main as cli
from phi3jax.cli import plan
from phi3jax.config import Phi3Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHI3_MINI_PARAMS = 3_821_079_552


def run_plan(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "phi3jax", "plan", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason="the TPU compiler comes with `pip install libtpu`")


@pytest.fixture(scope="module")
def mini_on_v5e() -> dict:
    proc = run_plan("--config", "phi-3-mini-4k", "--target", "v5e:4x4", "--dtype", "bfloat16", "--remat", "full",
                    "--seq", "128", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@needs_libtpu
def test_phi3_mini_train_step_compiles_for_v5e(mini_on_v5e):
    p = mini_on_v5e
    assert p["num_params"] == PHI3_MINI_PARAMS
    assert p["platform"] == "tpu" and p["devices"] == 16 and "v5e" in p["target"]
    assert p["attention"] == "pallas"  # what attention_impl=auto runs on a TPU, not on this CPU
    assert p["mesh"] == {"data": 1, "fsdp": 16, "sequence": 1, "tensor": 1}
    assert p["argument_bytes"] and p["temp_bytes"] and p["fits"]
    assert p["usable_hbm_bytes"] == int(15.75 * 2**30) and p["usable_hbm_source"] == "as the TPU compiler reports it"


@needs_libtpu
def test_plan_parameter_and_optimizer_memory_agrees_with_the_parameter_count(mini_on_v5e):
    p = mini_on_v5e
    cfg = Phi3Config.preset("phi-3-mini-4k")
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size  # RMSNorm scales: replicated, not sharded
    sharded = (PHI3_MINI_PARAMS - norms) / 16
    # float32 parameters (4 bytes) + AdamW's two float32 moments (8 bytes), 1/16 per chip.
    assert p["params_bytes"] == 4 * (sharded + norms)
    assert p["opt_state_bytes"] - 8 * (sharded + norms) < 64  # + a few int32 step counters
    # 12 bytes x 3.82e9 / 16 chips = 2.87 GB: what the compiler's arguments hold, plus layout padding
    # (head_dim 96 pads to the 128-lane tile), plus the batch.
    arithmetic = 12 * PHI3_MINI_PARAMS / 16
    assert abs(p["params_bytes"] + p["opt_state_bytes"] - arithmetic) / arithmetic < 1e-3
    assert arithmetic < p["argument_bytes"] < 1.2 * arithmetic
    # The donated state comes back in place: outputs alias the arguments.
    assert p["output_bytes"] - p["alias_bytes"] < 1e6


@needs_libtpu
def test_plan_counts_the_step_flops(mini_on_v5e):
    p = mini_on_v5e
    tokens = p["batch"] * p["seq"]
    # Full remat: forward + recomputed forward + backward = 8 x params x tokens (less for the
    # embedding, which is a lookup), plus attention.
    assert 6 * PHI3_MINI_PARAMS * tokens < p["flops_total"] < 9 * PHI3_MINI_PARAMS * tokens
    assert p["flops_per_device"] == pytest.approx(p["flops_total"] / 16)


@needs_libtpu
def test_plan_rejects_a_tensor_axis_that_does_not_divide_the_heads():
    proc = run_plan("--config", "phi-3-medium-4k", "--target", "v5e:4x4", "--mesh", "fsdp=1,tensor=16")
    assert proc.returncode == 2
    assert "mesh.tensor=16 does not divide num_attention_heads=40" in proc.stderr


@needs_libtpu
def test_plan_rejects_a_mesh_that_does_not_match_the_topology():
    proc = run_plan("--config", "phi-3-mini-4k", "--target", "v5e:4x4", "--mesh", "fsdp=4,tensor=2")
    assert proc.returncode == 2
    assert "= 8 devices, but there are 16 devices" in proc.stderr


@needs_libtpu
@pytest.mark.parametrize("target, chips, hbm_gib", [("v4:2x2x1", 4, 32), ("v5p:2x2x1", 4, 95), ("v6e:2x2", 4, 32)])
def test_every_tpu_generation_compiles(target, chips, hbm_gib):
    proc = run_plan("--config", "tiny", "--target", target, "--mesh", "fsdp=-1,tensor=2", "--seq", "128", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    p = json.loads(proc.stdout)
    # v4 / v5p: one device per chip (megacore), not one per TensorCore.
    assert p["devices"] == chips and p["mesh"]["tensor"] == 2 and p["hbm_bytes"] == hbm_gib * 2**30
    assert p["fits"] and p["argument_bytes"] > p["params_bytes"] > 0


@needs_libtpu
def test_plan_reads_a_train_py_config(tmp_path):
    # The same YAML train.py takes: its model, mesh, batch_size and seq_len; --mesh overrides one axis.
    config = tmp_path / "small.yaml"
    config.write_text("model: {preset: tiny, num_hidden_layers: 2, remat_policy: full}\n"
                      "mesh: {data: 1, fsdp: -1, tensor: 2, sequence: 1}\nbatch_size: 8\nseq_len: 64\n"
                      "optim: {accum_steps: 2}\n")
    proc = run_plan("--config", str(config), "--target", "v5e:2x4", "--mesh", "data=2", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    p = json.loads(proc.stdout)
    assert p["mesh"] == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    assert (p["batch"], p["seq"], p["accum_steps"], p["remat_policy"]) == (8, 64, 2, "full")
    assert p["num_params"] == Phi3Config.preset("tiny", num_hidden_layers=2).num_params()


@needs_libtpu
def test_multi_slice_plan_puts_the_data_axis_across_slices():
    proc = run_plan("--config", "tiny", "--target", "v5e:2x2", "--num-slices", "2", "--seq", "128", "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    p = json.loads(proc.stdout)
    assert p["devices"] == 8 and p["mesh"] == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1} and p["fits"]
    # The hybrid mesh: every row of the data axis is one slice.
    script = ("from phi3jax import parallel; from phi3jax.cli import plan; t = plan.parse_target('v5e:2x2', 2); "
              "m = parallel.make_mesh({}, devices=plan.topology_devices(t)); "
              "print([sorted({d.slice_index for d in m.devices[i].flat}) for i in range(2)])")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[[0], [1]]", out.stderr[-2000:]


@pytest.mark.parametrize("target", ["v9x:4x4", "v5e:4x4x4", "v5e-12", "tpu", "v5p:2x2"])
def test_plan_rejects_an_unknown_target(target, capsys):
    if target == "v5p:2x2":  # 2-D name for a 3-D torus: read as 2x2x1
        assert plan.parse_target(target).shape == (2, 2, 1)
        return
    assert cli.main(["plan", "--config", "phi-3-mini-4k", "--target", target]) == 2
    err = capsys.readouterr().err
    assert f"--target {target!r}" in err and ("not a known topology" in err or "topology has" in err
                                             or "no TPU v5e slice of that size" in err)


@pytest.mark.parametrize("name, chips, shape", [("v5e:16x16", 256, (16, 16)), ("v5e-256", 256, (16, 16)),
                                                ("v5p-128", 64, (4, 4, 4)), ("v4:2x2x2", 8, (2, 2, 2)),
                                                ("v6e:4x8", 32, (4, 8)), ("h100:8", 8, (8,))])
def test_target_names(name, chips, shape):
    t = plan.parse_target(name)
    assert (t.chips, t.shape) == (chips, shape)


def test_plan_rejects_an_unknown_config(capsys):
    assert cli.main(["plan", "--config", "phi-9", "--target", "v5e:2x2"]) == 2
    assert "not a preset" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.parametrize("chip, topology", [("v5e", "v5e:1x1"), ("v4", "v4:2x2x1"), ("v5p", "v5p:2x2x1"),
                                            ("v6e", "v6e:2x2")])
def test_usable_hbm_is_what_the_tpu_compiler_reports(chip, topology):
    """The compiler's "available HBM" (the chip's HBM less the runtime's reserve), which the CHIPS table
    repeats for when it cannot be asked: a new libtpu that changes it fails here."""
    target = plan.parse_target(topology)
    usable, source = plan.usable_hbm(target, plan.topology_devices(target)[0])
    assert source == "as the TPU compiler reports it"
    assert usable == plan.CHIPS[chip].usable_hbm_bytes


def test_the_fit_is_judged_against_the_usable_hbm():
    """Phi-3-mini at 24 x 4096 with full remat plans at a 15.89 GiB peak on v5e: more than the 15.75 GiB
    a program may use there, though less than the chip's 16 GiB (which is what it was compared with)."""
    usable = plan.CHIPS["v5e"].usable_hbm_bytes
    assert usable == int(15.75 * 2**30)
    assert not plan.fits_hbm(int(15.89 * 2**30), usable)
    assert plan.fits_hbm(usable, usable) and not plan.fits_hbm(usable + 1, usable)
    assert plan.fits_hbm(int(15.7 * 2**30), usable)
    new = "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, ... exceeds available HBM (15.75G)."
    old = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
           "Used 16.02G of 15.75G hbm. Exceeded hbm capacity by 275.12M.")
    assert plan.reported_hbm_bytes(new) == plan.reported_hbm_bytes(old) == usable
    assert plan.reported_hbm_bytes("INTERNAL: something else") is None


def test_plan_text_names_the_usable_hbm():
    fields = dict(model="phi-3-mini-4k", num_params=PHI3_MINI_PARAMS, target="TPU v5e 4x4 (16 chips)", platform="tpu",
                  estimate_note=None, devices=16, mesh={"data": 1, "fsdp": 16, "sequence": 1, "tensor": 1}, batch=24,
                  seq=4096, accum_steps=1, dtype="bfloat16", param_dtype="float32", remat_policy="full",
                  attention="pallas", compile_seconds=60.0, hbm_bytes=16 * 2**30, params_bytes=2**30,
                  opt_state_bytes=2**31, batch_bytes=2**20, argument_bytes=4 * 2**30, output_bytes=3 * 2**30,
                  alias_bytes=3 * 2**30, temp_bytes=int(11.89 * 2**30), code_bytes=0, peak_bytes=int(15.89 * 2**30),
                  usable_hbm_bytes=int(15.75 * 2**30), usable_hbm_source="as the TPU compiler reports it")
    text = plan.format_plan(plan.Plan(fits=False, **fields))
    assert ("peak                              15.890 GiB  of 15.750 GiB usable (of 16.000 GiB HBM, as the TPU "
            "compiler reports it): DOES NOT FIT") in text


def test_plan_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now fails, as where it is not installed
    assert cli.main(["plan", "--config", "tiny", "--target", "v5e:2x2"]) == 2
    err = capsys.readouterr().err
    assert "phi3jax plan compiles for TPUs with libtpu" in err and "not installed" in err, err
    assert "`tpu` or `dev` extra" in err and "pip install libtpu" in err


@needs_libtpu
def test_qlora_phi3_medium_step_fits_one_v5e_chip():
    """The QLoRA step of Phi-3-medium (nf4 base, rank 16 on every projection) at 2048 tokens,
    compiled by libtpu for one v5e chip (15.75 of its 16 GiB usable): it fits, and the breakdown adds up."""
    proc = run_plan("--config", "phi-3-medium-4k", "--target", "v5e:1x1", "--seq", "2048", "--batch", "1",
                    "--remat", "full", "--dtype", "bfloat16", "--param-dtype", "bfloat16", "--json",
                    "lora.rank=16", "lora.base_dtype=nf4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    p = json.loads(proc.stdout)
    assert p["lora"] == "rank 16, alpha 32, targets qkv,o,gate_up,down, base nf4"
    assert p["fits"] and p["peak_bytes"] <= p["usable_hbm_bytes"] == int(15.75 * 2**30), p
    cfg = Phi3Config.preset("phi-3-medium-4k")
    projections = cfg.num_params() - 2 * cfg.vocab_size * cfg.hidden_size - (2 * cfg.num_hidden_layers + 1) * (
        cfg.hidden_size)
    # nf4: half a byte per weight, plus a float32 scale per block of 64 (hidden 5120 and mlp 17920 divide by 64)
    assert p["frozen_projection_bytes"] == projections // 2 + 4 * projections // 64
    assert p["frozen_other_bytes"] == 2 * (cfg.num_params() - projections)  # embed, lm_head, norms in bf16
    layer = 40 * 16 * (5120 + 7680 + 5120 + 5120 + 5120 + 35840 + 17920 + 5120)  # A and B of the 4 targets
    assert p["params_bytes"] == 4 * layer and p["opt_state_bytes"] - 8 * layer < 64  # float32 adapters + AdamW


def test_plan_lora_settings_are_checked(capsys):
    with pytest.raises(plan.PlanError, match="lora.KEY=VALUE"):
        plan.lora_overrides(None, ["rank=4"])
    with pytest.raises(plan.PlanError, match="lora.base_dtype"):
        plan.lora_overrides(None, ["lora.base_dtype=int4"])
    assert plan.lora_overrides(None, []) is None
    assert plan.lora_overrides(None, ["lora.targets=qkv,o"]).targets == ("qkv", "o")


@needs_libtpu
def test_dpo_plan_reports_the_reference_and_precomputed_and_adapter_off_add_no_parameter_sized_buffer():
    """The preference step compiled by libtpu for one v5e chip (the tiny preset, 2 x 256): a frozen
    reference adds a copy of what is trained to the arguments; `precomputed` adds one float per batch
    position and `adapter_off` nothing, and neither adds a temporary anywhere near the parameters' size."""
    from phi3jax.config import LoraConfig
    from phi3jax.train.dpo import DpoConfig

    target, inputs = plan.parse_target("v5e:1x1"), plan.plan_inputs("tiny")

    def compiled(lora=None, dpo=None):
        inputs.dpo = dpo
        p = plan.make_plan(inputs, target, batch=2, seq=256, lora=lora)
        assert p.fits and p.argument_bytes
        return p

    lm, frozen = compiled(), compiled(dpo=DpoConfig(reference="frozen"))
    pre = compiled(dpo=DpoConfig(reference="precomputed"))
    assert frozen.reference_bytes == lm.params_bytes and frozen.argument_bytes - lm.argument_bytes >= lm.params_bytes
    assert pre.reference_bytes == 0 and pre.argument_bytes - lm.argument_bytes == 2 * 256 * 4  # ref_logps [2, 256]
    assert pre.temp_bytes - lm.temp_bytes < lm.params_bytes / 20
    lora = LoraConfig(rank=16, base_dtype="bfloat16")
    plain, off = compiled(lora=lora), compiled(lora=lora, dpo=DpoConfig(reference="adapter_off"))
    base = plain.frozen_projection_bytes + plain.frozen_other_bytes
    assert off.reference_bytes == 0 and off.argument_bytes == plain.argument_bytes
    assert off.temp_bytes - plain.temp_bytes < base / 20
    assert "reference adapter_off" in plan.format_plan(off) and "(none of its own)" in plan.format_plan(off)
    with pytest.raises(plan.PlanError, match="adapter_off"):
        compiled(dpo=DpoConfig(reference="adapter_off"))


def test_plan_dpo_settings_are_checked():
    assert plan.dpo_overrides(None, []) is None
    assert plan.dpo_overrides(None, ["objective=dpo"]).reference == "frozen"
    assert plan.dpo_overrides(None, ["dpo.reference=precomputed"]).reference == "precomputed"
    assert plan.dpo_overrides(plan.dpo_overrides(None, ["objective=dpo"]), ["objective=lm"]) is None
    with pytest.raises(plan.PlanError, match="dpo.KEY=VALUE"):
        plan.dpo_overrides(None, ["beta=0.2"])
    with pytest.raises(plan.PlanError, match="dpo.loss"):
        plan.dpo_overrides(None, ["dpo.loss=kto"])
