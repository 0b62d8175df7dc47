"""Shared test helpers: small random-weight Hugging Face Phi-3 checkpoints built on the spot.

Two ways to make one:
* `make_hf_dir`: config.json written by transformers' own `Phi3Config` and random weights under
  Hugging Face's tensor names, saved with `safetensors` directly. No PyTorch: runs everywhere.
* `make_hf_model`: a real `transformers.Phi3ForCausalLM` (PyTorch), returned for logit comparisons.
  Tests that use it carry the `torch` marker; where PyTorch is not installed they are deselected
  (CI runs them in its Python 3.11 environment, with the `hf` extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (a dev dependency, for the AOT TPU compiles) otherwise takes a host-wide lock: a second
# process (a parallel test run, another tool) could then not create TPU topologies.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = pathlib.Path(__file__).resolve().parent.parent
PHI3_VOCAB = REPO / "tests" / "data" / "phi3-vocab"  # the real Phi-3 vocabulary, vendored (see its README)
HAVE_TORCH = importlib.util.find_spec("torch") is not None

# A small Phi-3: 2 layers, hidden 64, 4 heads of 16. pad_token_id must be inside the vocab.
BASE_HF_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      original_max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, sliding_window=None, rms_norm_eps=1e-5)


def pytest_collection_modifyitems(config, items):
    """Deselect the `torch` tests where PyTorch is missing, and say so; PHI3JAX_REQUIRE_TORCH=1
    (CI's reference environment) makes a missing PyTorch an error instead."""
    if HAVE_TORCH:
        return
    torch_items = [item for item in items if item.get_closest_marker("torch")]
    if not torch_items:
        return
    if os.environ.get("PHI3JAX_REQUIRE_TORCH") == "1":
        raise pytest.UsageError("PHI3JAX_REQUIRE_TORCH=1 but torch is not installed (pip install -e '.[test,hf]')")
    config.hook.pytest_deselected(items=torch_items)
    items[:] = [item for item in items if not item.get_closest_marker("torch")]
    reporter = config.pluginmanager.get_plugin("terminalreporter")  # None in pytest-xdist's workers
    if reporter is not None:
        reporter.write_line(f"{len(torch_items)} tests need PyTorch (the Hugging Face reference) and are deselected "
                            "here; CI runs them on Python 3.11 with the `hf` extra (.ci/run)")


# Skip reasons that mean "something the dev extra or the repository provides is missing". CI's main end
# (PHI3JAX_CI_END=newest, `pip install -e ".[dev]"`) installs everything, so there such a skip is a
# failure: it would hide a missing dependency or missing test data behind a green run.
MISSING_SOMETHING = ("dev dependency", "not installed", "pip install", "is not at", "could not import")


def _failed_in_ci(report: pytest.BaseReport) -> None:
    if os.environ.get("PHI3JAX_CI_END") != "newest" or not report.skipped:
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if any(text in reason for text in MISSING_SOMETHING):
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI ({reason}): CI's main end installs the dev extra and has the "
                           "repository's test data, so this skip would hide something missing")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _failed_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _failed_in_ci(outcome.get_result())


def longrope_parameters(rotary_dim: int, theta: float = 10000.0, **extra: float) -> dict:
    half = rotary_dim // 2
    return dict(rope_type="longrope", rope_theta=theta, short_factor=np.linspace(1.0, 1.5, half).tolist(),
                long_factor=np.linspace(1.0, 6.0, half).tolist(), **extra)


def make_hf_model(directory: str | os.PathLike, seed: int = 0, dtype: str = "float32", **overrides):
    """Build, randomise (norm weights away from 1) and save a transformers Phi3ForCausalLM (needs torch)."""
    import torch
    import transformers

    config = transformers.Phi3Config(**{**BASE_HF_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # a wrong norm must show in the logits
            else:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    return model


def hf_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Phi3ForCausalLM's tensors (Hugging Face's names and [out, in] shapes) for a transformers config."""
    d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = d // config.num_attention_heads
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes.update({
            p + "self_attn.qkv_proj.weight": ((config.num_attention_heads + 2 * config.num_key_value_heads) * hd, d),
            p + "self_attn.o_proj.weight": (d, config.num_attention_heads * hd),
            p + "mlp.gate_up_proj.weight": (2 * i, d), p + "mlp.down_proj.weight": (d, i),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def make_hf_dir(directory: str | os.PathLike, seed: int = 0, dtype: str = "float32", **overrides) -> pathlib.Path:
    """A Hugging Face Phi-3 directory with random weights, without PyTorch: transformers writes the
    config, `safetensors.numpy` the tensors (norms drawn away from 1, as in `make_hf_model`)."""
    import ml_dtypes
    import transformers
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    config = transformers.Phi3Config(**{**BASE_HF_CONFIG, **overrides})
    config.save_pretrained(directory)
    rng = np.random.default_rng(seed)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    tensors = {name: (rng.uniform(0.5, 1.5, shape) if "norm" in name else rng.normal(0.0, 0.08, shape))
               .astype(np.float32).astype(np_dtype) for name, shape in hf_tensor_shapes(config).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((directory / "config.json").read_text())
    raw["dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory


@pytest.fixture(scope="session")
def phi3_vocab() -> pathlib.Path:
    assert (PHI3_VOCAB / "tokenizer.model").is_file(), f"the vendored Phi-3 vocabulary is missing at {PHI3_VOCAB}"
    return PHI3_VOCAB
