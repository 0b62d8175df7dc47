"""notebooks/quickstart.ipynb runs top to bottom (on CPU, as CI runs it)."""

from __future__ import annotations

import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every cell runs without error (a failing shell command fails its cell)."""
    monkeypatch.setenv("PHI3JAX_QUICKSTART_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "max |logit difference|" in outputs
    assert (tmp_path / "work" / "runs" / "sft").is_dir() and (tmp_path / "work" / "sft-f16.gguf").is_file()
    assert (tmp_path / "work" / "lora-peft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "work" / "lora-f16.gguf").is_file()
    assert (tmp_path / "work" / "runs" / "dpo" / "reference_logps.json").is_file()
    assert "rewards/accuracies" in outputs
    print(f"the notebook ran in {seconds:.0f} s")
