"""dp in a subprocess (to kill it, interrupt it or run it under torchrun) and comparing the weights it wrote.

One thread everywhere (in the test process through ``single_thread``, and in the subprocesses through
``SUBPROCESS_ENV``): runs stay comparable bit for bit, and tiny models are faster single-threaded on a
shared 2-core machine anyway."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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
