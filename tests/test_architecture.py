"""The layering of docs/architecture.md, checked on the source: imports point only downward, no cycles,
`pallas_kernels` imports nothing from phi3jax, and the model has no platform branch.

The import graph is read with `ast` from every module of phi3jax/, eval/ (installed as phi3jax.eval)
and pallas_kernels/, imports inside functions included: a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOTS = {"phi3jax": REPO / "phi3jax", "phi3jax.eval": REPO / "eval", "pallas_kernels": REPO / "pallas_kernels"}

# Lowest first. A module may import from its own layer or a lower one, never from a higher one.
LAYERS = ("base", "parallel", "ops", "model", "services", "apps")
# The package's own __init__ is the public facade: it names things of every layer (lazily, so
# importing any one module loads nothing else), so it sits on top.
APP_MODULES = {"phi3jax", "phi3jax.__main__", "phi3jax.train.__main__", "phi3jax.convert.__main__"}


def layer_of(module: str) -> str:
    if module in APP_MODULES or module.startswith("phi3jax.cli"):
        return "apps"
    for prefix, layer in (("phi3jax.parallel", "parallel"), ("phi3jax.ops", "ops"), ("pallas_kernels", "ops"),
                          ("phi3jax.model", "model"), ("phi3jax.rope", "model"),
                          ("phi3jax.lora", "model"), ("phi3jax.inference", "services"),
                          ("phi3jax.train", "services"), ("phi3jax.convert", "services"), ("phi3jax.eval", "services")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    if module in ("phi3jax.config", "phi3jax._rope_factors", "phi3jax.tokenizer"):
        return "base"
    raise AssertionError(f"{module} is in no layer: add it to docs/architecture.md and to this table")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c` imports the module a.b.c when there is one, else a name of a.b.
                names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                         for alias in node.names]
            targets.update(name for name in names if name in known and name != module)
        graph[module] = targets
    return graph


def test_every_module_belongs_to_a_layer():
    for module in modules():
        assert layer_of(module) in LAYERS


def test_imports_point_only_down_the_layers():
    upward = [f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module))]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_pallas_kernels_import_nothing_from_phi3jax():
    leaks = [f"{m} imports {t}" for m, targets in import_graph().items() if m.startswith("pallas_kernels")
             for t in targets if t.startswith("phi3jax")]
    assert not leaks, leaks


@pytest.mark.parametrize("module", ["phi3jax/model.py", "phi3jax/rope.py"])
def test_the_model_has_no_branch_on_the_platform_or_the_attention_backend(module):
    """The model reads top to bottom: which attention backend runs, and on what, is decided in
    phi3jax.ops.attention alone."""
    tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
    words = {"cpu", "tpu", "gpu", "cuda", "xla", "pallas", "splash", "cudnn", "ring", "auto"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not strings & words, strings & words
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    forbidden = {"default_backend", "devices", "platform", "platform_of", "select_backend", "attention_impl"}
    # attention_impl may be handed on to the dispatcher, never compared
    compared = [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and any(
        isinstance(x, ast.Attribute) and x.attr == "attention_impl" for x in [n.left, *n.comparators])]
    assert not (names & forbidden - {"attention_impl"}), names & forbidden
    assert not compared


def test_eval_installs_as_phi3jax_eval_and_every_package_is_listed():
    """eval/ stays at the top of the repository but installs as phi3jax.eval, never as a top-level `eval`."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = set(config["packages"])
    assert "eval" not in packages and config["package-dir"] == {"phi3jax.eval": "eval"}
    on_disk = {module for module, path in modules().items() if path.name == "__init__.py"}
    assert packages == on_disk


def test_the_package_exports_its_public_names_lazily():
    """`import phi3jax` (or one light module) loads no JAX; the public names load on first use."""
    import subprocess
    import sys

    script = ("import sys, phi3jax, phi3jax.tokenizer, phi3jax.config; light = 'jax' not in sys.modules; "
              "from phi3jax import Phi3Config, forward, generate, load_hf, save_hf; "
              "print(light, callable(generate), generate.__module__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.split() == ["True", "True", "phi3jax.inference.generate"], out.stderr[-2000:]
