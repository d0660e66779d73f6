"""dp in a subprocess (to kill it, interrupt it or run it under torchrun) and comparing the weights it wrote.

One thread everywhere (in the test process through ``single_thread``, and in the subprocesses through
``SUBPROCESS_ENV``): runs stay comparable bit for bit, and tiny models are faster single-threaded on a
shared 2-core machine anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# builtin:ddpm-digits is trained, so its loss falls and the threshold stops the scan early (at t = 8 with
# these settings), far from any tie: the stopping test compares losses that differ by several percent.
DIGITS_SCAN = ["builtin:ddpm-digits", "--data", "builtin:digits", "--threshold", "0.4", "--timesteps", "30"]


def run_dp(args, processes: int = 1) -> dict:
    """``dp ARGS... --json`` in this process (1) or under torchrun with 2 gloo processes: its JSON report
    (rank 0 alone prints), after asserting it succeeded."""
    from dpcli.testing import invoke

    args = [*map(str, args), "--json"]
    if processes == 1:
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
        return result.json
    assert processes == 2, "TORCHRUN starts 2 processes"
    proc = subprocess.run(
        [*TORCHRUN, "-m", "dpcli", *args], capture_output=True, text=True, env=SUBPROCESS_ENV
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def popen_dp(*args) -> subprocess.Popen:
    """``python -m dpcli ARGS...`` started in the background, one thread, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "dpcli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=SUBPROCESS_ENV,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until ``path`` exists; fail if ``process`` ended first or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"dp exited early: {process.communicate()[1]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
