"""What the README, the notebook and docs/ tell users: their Python runs, their figures are the config's.

* The README's "Use it from Python" snippet runs as printed, on a tiny random model.
* The figures quoted about the default recipe (`python train.py`, i.e. configs/tiny.yaml, and
  the `tiny` preset) are those of the config, so a change to one without the other fails here.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def readme_python_snippet() -> str:
    section = _section(README.read_text(encoding="utf-8"), "Use it from Python")
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's 'Use it from Python' section should hold one ```python block"
    return blocks[0]


def test_readme_python_snippet_runs_text_in_text_out(tmp_path, capsys):
    from testmodels import make_random_phi3

    model = make_random_phi3(tmp_path / "model")
    code = readme_python_snippet()
    for placeholder in ('"path/to/Phi-3-mini-4k-instruct"', '"out_dir"'):
        assert placeholder in code, f"README's Python snippet no longer uses {placeholder}; update this test"
    code = code.replace('"path/to/Phi-3-mini-4k-instruct"', repr(str(model)))
    code = code.replace('"out_dir"', repr(str(tmp_path / "exported")))
    namespace: dict = {}
    exec(compile(code, "README.md (Use it from Python)", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("def fibonacci(n):") and len(printed[0]) > len("def fibonacci(n):")
    assert any(line.startswith("The capital of France is") for line in printed)
    out, tok = namespace["out"], namespace["tok"]
    assert len(out) == 2 and all(isinstance(row, list) and row == list(map(int, row)) for row in out)
    assert namespace["logits"].shape == (1, len(namespace["prompts"][0]), namespace["cfg"].vocab_size)
    assert (tmp_path / "exported" / "config.json").is_file()
    assert isinstance(tok.decode(out[1]), str)


# ------------------------------------------------------------------------- the default recipe
def _tiny() -> dict:
    """configs/tiny.yaml (what `python train.py` runs) and the `tiny` preset, as dotted keys."""
    from phi3jax.config import Phi3Config

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text(encoding="utf-8"))
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    preset = Phi3Config.preset(config["model"]["preset"])
    flat.update({"preset.layers": preset.num_hidden_layers, "preset.hidden": preset.hidden_size,
                 "preset.heads": preset.num_attention_heads, "preset.kv_heads": preset.num_key_value_heads})
    return flat


def _notebook_text() -> str:
    nb = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text(encoding="utf-8"))
    return "\n".join("".join(cell["source"]) for cell in nb["cells"])


def _thousands(text: str) -> int:
    return int(text) * 1024


def _percent(text: str) -> float:
    return int(text) / 100


def _bool(text: str) -> bool:
    return {"true": True, "false": False}[text]


# (file, phrase with named groups, {group: (config key, parse)}). `\s+` lets a phrase wrap lines.
RECIPE_PHRASES = [
    ("README.md", r"trains a (?P<vocab>\d+)k-piece SentencePiece\s+(?:BPE\s+)?vocabulary",
     {"vocab": ("data.vocab_size", _thousands)}),
    ("README.md", r"saves\s+`runs/tiny/checkpoints/(?P<steps>\d+)/`", {"steps": ("steps", int)}),
    ("README.md", r'python train\.py && phi3jax generate --ckpt runs/tiny --prompt "(?P<prompt>[^"]*)"',
     {"prompt": ("log.sample_prompt", str)}),
    ("docs/training.md", r"(?P<val>\d+)% of the characters", {"val": ("data.val_fraction", _percent)}),
    ("docs/training.md", r"SentencePiece BPE model \((?P<vocab>\d+) pieces", {"vocab": ("data.vocab_size", int)}),
    ("docs/training.md", r"`tiny` preset \((?P<layers>\d+) layers, hidden (?P<hidden>\d+), (?P<heads>\d+) query "
     r"heads\s+sharing (?P<kv>\d+) kv heads",
     {"layers": ("preset.layers", int), "hidden": ("preset.hidden", int), "heads": ("preset.heads", int),
      "kv": ("preset.kv_heads", int)}),
    ("docs/training.md", r"for (?P<steps>\d+) steps of (?P<batch>\d+) x (?P<seq>\d+) tokens, AdamW (?P<lr>[\d.e-]+) "
     r"with (?P<warmup>\d+) warmup steps",
     {"steps": ("steps", int), "batch": ("batch_size", int), "seq": ("seq_len", int),
      "lr": ("optim.learning_rate", float), "warmup": ("optim.warmup_steps", int)}),
    ("docs/training.md", r"Saves `runs/tiny/checkpoints/(?P<steps>\d+)/`", {"steps": ("steps", int)}),
    ("docs/training.md", r'generates a sample from\s+"(?P<prompt>[^"]*)"', {"prompt": ("log.sample_prompt", str)}),
    ("docs/training.md", r"\| `data\.vocab_size` \| (?P<vocab>\d+) \|", {"vocab": ("data.vocab_size", int)}),
    ("docs/training.md", r"\| `data\.val_path` / `data\.val_fraction` \| - / (?P<val>[\d.]+) \|",
     {"val": ("data.val_fraction", float)}),
    ("docs/training.md", r"\| `steps`, `batch_size`, `seq_len` \| (?P<steps>\d+), (?P<batch>\d+), (?P<seq>\d+) \|",
     {"steps": ("steps", int), "batch": ("batch_size", int), "seq": ("seq_len", int)}),
    ("docs/training.md", r"\| `save_every`, `keep_checkpoints`, `async_checkpointing` \| (?P<save>\d+), "
     r"(?P<keep>\d+), (?P<async>true|false) \|",
     {"save": ("save_every", int), "keep": ("keep_checkpoints", int), "async": ("async_checkpointing", _bool)}),
    ("notebooks/quickstart.ipynb", r"the default recipe \(`python train\.py`\) is (?P<steps>\d+) steps of "
     r"(?P<batch>\d+) x (?P<seq>\d+) tokens", {"steps": ("steps", int), "batch": ("batch_size", int),
                                               "seq": ("seq_len", int)}),
    ("notebooks/quickstart.ipynb", r"`tiny` preset \((?P<layers>\d+) layers, hidden (?P<hidden>\d+)\)",
     {"layers": ("preset.layers", int), "hidden": ("preset.hidden", int)}),
    ("notebooks/quickstart.ipynb", r"training a (?P<vocab>\d+)k-piece\s+SentencePiece vocabulary",
     {"vocab": ("data.vocab_size", _thousands)}),
]


@pytest.mark.parametrize("path, phrase, fields", RECIPE_PHRASES,
                         ids=[f"{path}-{k}" for k, (path, _, _) in enumerate(RECIPE_PHRASES)])
def test_docs_quote_the_default_recipe_as_configured(path, phrase, fields):
    text = _notebook_text() if path.endswith(".ipynb") else (REPO / path).read_text(encoding="utf-8")
    found = re.search(phrase, text)
    assert found, (f"{path} no longer has the phrase /{phrase}/ about the default recipe (configs/tiny.yaml): "
                   "if it was reworded, update RECIPE_PHRASES in tests/test_docs.py to the new wording")
    tiny = _tiny()
    wrong = [f"{found.group(group)!r} (config: {key} = {tiny[key]!r})" for group, (key, parse) in fields.items()
             if parse(found.group(group)) != tiny[key]]
    assert not wrong, (f"{path} says {found.group(0)!r}, which disagrees with configs/tiny.yaml / the tiny preset: "
                       f"{'; '.join(wrong)}")


def test_the_recipe_phrases_catch_a_wrong_figure():
    """The check above is not vacuous: the issue's stale sentence fails it."""
    _, phrase, fields = RECIPE_PHRASES[-3]
    found = re.search(phrase, "the default recipe (`python train.py`) is 250 steps of 16 x 256 tokens")
    tiny = _tiny()
    assert [g for g, (key, parse) in fields.items() if parse(found.group(g)) != tiny[key]] == ["steps", "batch"]


def test_readme_runs_the_notebook_with_a_command_the_test_extra_installs():
    """`jupyter nbconvert --execute` needs nbconvert, which phi3jax does not install; the README gives
    nbclient's `jupyter execute` (what tests/test_notebook.py runs the notebook with, from Python)."""
    metadata = pytest.importorskip("importlib.metadata")
    pytest.importorskip("nbclient")
    section = _section(README.read_text(encoding="utf-8"), "Quickstart notebook")
    assert "jupyter execute notebooks/quickstart.ipynb" in section
    scripts = {e.name for e in metadata.distribution("nbclient").entry_points if e.group == "console_scripts"}
    assert "jupyter-execute" in scripts
    test_extra = re.search(r"^test = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M)
    assert test_extra and '"nbclient' in test_extra.group(1)
