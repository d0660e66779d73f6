"""How a job tells its caller what it is doing: one ``Reporter`` for every job.

The jobs (``dpcli.jobs.*``) call ``status`` (what happens now), ``progress`` (a counted stage),
``warn`` (something the user should know; the run goes on) and ``step`` (fine-tuning: after every
optimizer step, with the step's ``StepInfo``). This base class shows nothing: it is what the Python API
passes by default. ``dp`` passes ``dpcli.cli.reporter.RichReporter`` (status line, progress bars on
stderr). Depends on nothing heavy.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator


class Reporter:
    """Silent: every method does nothing (``warn`` issues a Python warning). Subclass and override."""

    def status(self, text: str) -> None:
        """What the job is doing now (``Loading model``, ``Pruning``...), until the next status or stage."""

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A stage of ``total`` units. Yields ``advance(n=1, *, completed=None, note=None)``: ``n`` more
        units done, or ``completed`` in all; ``note`` is a short text shown beside the bar (a loss...).
        A stage that stops early (the timestep scan at its cutoff) ends where it got to."""
        yield _ignore

    def warn(self, text: str) -> None:
        """Something the user should know; the job goes on."""
        warnings.warn(text, stacklevel=2)

    def step(self, info) -> None:
        """After every fine-tuning optimizer step (``dpcli.jobs.finetune.loop.StepInfo``)."""


def _ignore(*args, **kwargs) -> None:
    return None


class StepCallback(Reporter):
    """A silent reporter that calls ``on_step(info)`` after every fine-tuning step."""

    def __init__(self, on_step: Callable):
        self.on_step = on_step

    def step(self, info) -> None:
        self.on_step(info)


def silent(reporter: Reporter | None) -> Reporter:
    """``reporter``, or the silent one."""
    return reporter if reporter is not None else Reporter()
