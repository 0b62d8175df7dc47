"""The declared jax range is the one CI runs: its lower bound is the version CI's oldest environment
installs, its upper bound admits exactly the release series of the newest one, and a CI run checks
that the jax it runs is the one it meant to (installs nothing)."""

from __future__ import annotations

import os
import pathlib
import re
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def declared_range() -> tuple[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"jax\b(?!lib)", d)]
    low, high = re.fullmatch(r"jax>=([\d.]+),<([\d.]+)", spec).groups()
    return low, high


def ci_pin(end: str, package: str = "jax") -> str:
    text = (REPO / ".ci" / f"{end}.txt").read_text(encoding="utf-8")
    return re.search(rf"^{package}==([\d.]+)$", text, re.M).group(1)


def series(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_the_lower_bound_is_the_version_ci_runs_at_the_oldest_end():
    low, _ = declared_range()
    assert ci_pin("oldest") == ci_pin("oldest", "jaxlib") == low


def test_the_upper_bound_admits_exactly_the_series_ci_runs_at_the_newest_end():
    _, high = declared_range()
    newest = ci_pin("newest")
    assert ci_pin("newest", "jaxlib") == newest
    assert series(newest) < series(high) and (series(newest)[0], series(newest)[1] + 1) == series(high)


def test_the_extras_follow_the_same_range():
    low, high = declared_range()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for name, flavour in (("tpu", "tpu"), ("gpu", "cuda12")):
        assert extras[name] == [f"jax[{flavour}]>={low},<{high}"]


@pytest.mark.skipif("PHI3JAX_CI_END" not in os.environ, reason="only in CI, which says which end it runs")
def test_ci_runs_the_jax_it_pins():
    import jax

    assert jax.__version__ == ci_pin(os.environ["PHI3JAX_CI_END"])
