"""train.py with a fault injected, for the resume tests: `python tests/train_with_faults.py FAULT [train.py args]`.

FAULT is `kill_after_step:N` (SIGKILL after step N, once earlier saves are on disk), `kill_in_save:N`
(SIGKILL right after the asynchronous save of step N started), `sigterm_after_step:N`,
`sigint_after_step:N` (Ctrl-C), `sigint_twice_after_step:N` (Ctrl-C twice) or `hold_after_step:N`
(after step N, wait until the file RUN_DIR/release exists, at most 120 s). The faults live here, in
the tests, through the loop's `on_step` hook: the training loop carries none.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any


def fault_hook(spec: str) -> Any:
    """An `on_step(step, run)` hook that delivers the fault `spec` at its step."""
    name, _, at = spec.partition(":")
    at_step = int(at)

    def on_step(step: int, run: Any) -> None:
        if step != at_step:
            return
        if name == "kill_after_step":
            run.manager.wait_until_finished()  # "between saves": the earlier saves are on disk
            os.kill(os.getpid(), signal.SIGKILL)
        elif name == "kill_in_save":
            os.kill(os.getpid(), signal.SIGKILL)  # the save of this step was started just before
        elif name == "sigterm_after_step":
            os.kill(os.getpid(), signal.SIGTERM)
        elif name == "sigint_after_step":
            os.kill(os.getpid(), signal.SIGINT)
        elif name == "sigint_twice_after_step":
            run.manager.wait_until_finished()  # the earlier saves are on disk
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        elif name == "hold_after_step":
            release = os.path.join(run.run_dir, "release")
            deadline = time.monotonic() + 120
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            raise ValueError(f"unknown fault {spec!r}")

    return on_step


def main() -> int:
    spec, *args = sys.argv[1:]
    from phi3jax.cli.train import build_parser
    from phi3jax.train.config import load_config
    from phi3jax.train.loop import train

    parsed = build_parser().parse_args(args)
    try:
        result = train(load_config(parsed.config, parsed.overrides), on_step=fault_hook(spec))
    except ValueError as e:  # as train.py: one line, exit code 2
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 130 if result.status == "interrupted" else 0  # as train.py


if __name__ == "__main__":
    sys.exit(main())
