"""phi3jax.cli.process (host memory): on a CPU-only Linux host, memory XLA frees is reused without page faults.

Each check runs a fresh interpreter, since glibc reads its tunables only when a process starts.
What is counted is page faults (getrusage) and buffer addresses, not time: a 64 MB result
computed 12 times faults through 16,384 fresh 4 KiB pages on every call with glibc's defaults.
With reuse, calls get back blocks that earlier calls freed: a second or third block appears only
when a call starts before the previous result's (asynchronous) free has run, so the heap settles
at a few blocks instead of growing by one per call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from phi3jax.cli import process as host_memory

PROGRAM = textwrap.dedent("""
    import json, os, resource
    from phi3jax.cli.process import memory_reuse_active, reexec_with_memory_reuse

    pid = os.getpid()
    reexec_with_memory_reuse()  # may start this program over, in place
    import jax, jax.numpy as jnp

    CALLS = 12
    x = jnp.ones((4096, 4096), jnp.float32)
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    faults, addresses = [], []
    for _ in range(CALLS):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x).block_until_ready()
        addresses.append(y.unsafe_buffer_pointer())
        y.delete()  # frees the 64 MB result
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    reexec_with_memory_reuse()  # JAX's runtime has started: must not start over now
    print(json.dumps({"active": memory_reuse_active(), "pid": pid, "same_pid": pid == os.getpid(),
                      "tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults, "addresses": addresses}))
""")

PAGES = 4096 * 4096 * 4 // 4096  # 4 KiB pages in one 64 MB result

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux only")


def _run(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env={**environ, "JAX_PLATFORMS": "cpu", **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@linux_only
def test_freed_memory_is_reused_without_page_faults():
    result = _run()
    assert result["active"] and result["same_pid"], result
    assert result["tunables"] == host_memory.glibc_tunables(), result
    # The first call maps its block; the other 11 fault through at most 3 more blocks between them
    # (glibc's defaults: 11 blocks), and reuse at most 4 distinct blocks (no growth per call).
    assert sum(result["faults"][1:]) <= 3 * PAGES + PAGES // 10, result
    assert len(set(result["addresses"])) <= 4, result


@linux_only
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages hide the 4 KiB faults this counts")
def test_release_keeps_glibc_defaults_and_every_call_faults_again():
    result = _run(**{host_memory.ENV: "release"})
    assert not result["active"] and result["tunables"] is None, result
    assert min(result["faults"][1:]) > PAGES // 2, result


@linux_only
def test_user_tunables_are_kept():
    result = _run(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert result["active"], result
    assert result["tunables"].split(":")[0] == "glibc.malloc.arena_max=2"
    assert "glibc.malloc.arena_max=1" not in result["tunables"]


def test_glibc_tunables_adds_only_what_is_missing():
    ours = host_memory.glibc_tunables()
    assert ours == ":".join(f"{k}={v}" for k, v in host_memory.TUNABLES)
    assert host_memory.glibc_tunables(ours) == ours
    mixed = host_memory.glibc_tunables("glibc.malloc.tcache_count=3:glibc.rtld.nns=2")
    assert mixed.startswith("glibc.malloc.tcache_count=3:glibc.rtld.nns=2:")
    assert mixed.count("tcache_count") == 1 and "glibc.malloc.mmap_max=0" in mixed


def test_accelerator_or_opt_out_keeps_defaults(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert "tpu" in host_memory.why_not_reuse()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(host_memory.ENV, "release")
    assert host_memory.ENV in host_memory.why_not_reuse()


def test_cli_names_only_real_subcommands():
    # A renamed subcommand would silently lose the reuse; the dispatcher's list must match its commands.
    from phi3jax.cli import main as cli

    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(cli.RUNS_MODEL) <= set(commands), (cli.RUNS_MODEL, sorted(commands))
