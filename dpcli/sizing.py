"""Refusing a model that would not fit before any memory is allocated for it.

A config from outside (a file, a Hub repo, the ``dpcli.json`` of a pruned folder) decides how large the
model it describes is: ``block_out_channels: [16384, 16384]`` is tens of GB. Models are therefore built
first on torch's ``meta`` device (shapes only, no memory, no initialisation) and counted; one whose
weights would not fit in the memory available, or that has more parameters than the limit set with
``--max-params`` (or ``DPCLI_MAX_PARAMS``), is refused with a BadInput (exit code 2) and the numbers.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from dpcli.errors import BadInput, BadSetting

MAX_PARAMS_ENV = "DPCLI_MAX_PARAMS"
_max_params: contextvars.ContextVar[int | None] = contextvars.ContextVar("max_params", default=None)


@contextmanager
def params_limit(max_params: int | None) -> Iterator[None]:
    """Refuse models with more than ``max_params`` parameters inside the block (None: no limit beyond
    ``DPCLI_MAX_PARAMS`` and the memory available)."""
    if max_params is not None and max_params < 1:
        raise BadSetting("max_params", "{max_params} must be at least 1", got=max_params)
    token = _max_params.set(max_params)
    try:
        yield
    finally:
        _max_params.reset(token)


def max_params() -> int | None:
    """The parameter limit in force: ``params_limit``'s, else ``DPCLI_MAX_PARAMS``, else None."""
    limit = _max_params.get()
    if limit is not None:
        return limit
    text = os.environ.get(MAX_PARAMS_ENV, "").strip().replace("_", "")
    if not text:
        return None
    try:
        return int(float(text))
    except ValueError:
        raise BadInput(f"{MAX_PARAMS_ENV}={text!r} is not a number of parameters") from None


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable (Linux), bounded by the cgroup's limit; None
    where neither is known."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            available = None
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file, open("/sys/fs/cgroup/memory.current") as used:
            limit = limit_file.read().strip()
            if limit != "max":
                left = int(limit) - int(used.read().strip())
                available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def check_fits(model: torch.nn.Module, what: str) -> int:
    """Refuse ``model`` (built on the meta device) if it is above the parameter limit or its tensors
    would not fit in the memory available. Returns its number of parameters."""
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    limit = max_params()
    if limit is not None and params > limit:
        raise BadInput(
            f"{what} has {params:,} parameters, more than the limit of {limit:,} (--max-params, {MAX_PARAMS_ENV}); "
            "refused before allocating it"
        )
    available = available_memory()
    if available is not None and size > available:
        raise BadInput(
            f"{what} has {params:,} parameters: its weights need {_gigabytes(size)}, more than the "
            f"{_gigabytes(available)} of memory available; refused before allocating it"
        )
    return params


def check_buildable(build: Callable[[], torch.nn.Module], what: str) -> int:
    """Run ``build()`` on the meta device and ``check_fits`` what it makes: call it before building for
    real. Returns the number of parameters."""
    with torch.device("meta"):
        shapes_only = build()
    return check_fits(shapes_only, what)
