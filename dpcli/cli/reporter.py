"""The ``Reporter`` ``dp`` passes to the jobs: a status line and progress bars on stderr (no status line
when stderr is not a terminal), warnings in yellow. Disabled (torchrun ranks other than 0): nothing."""

from __future__ import annotations

import contextlib
import os

from dpcli.reporting import Reporter


def is_main_rank() -> bool:
    """Rank 0 of a torchrun job, or a single process: the one that prints (read from the environment, so
    it holds before and after the job's process group)."""
    return os.environ.get("RANK", "0") == "0"


class RichReporter(Reporter):
    """Use as a context manager: the live status or bar ends with it. Rich shows one live display at a
    time, so a stage's bar replaces the status line, and a status during a stage is printed as a line."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = is_main_rank() if enabled is None else enabled
        self._status = None
        self._bar = None

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop_status()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def status(self, text: str) -> None:
        from dpcli.cli import render as out

        if not self.enabled or not out.stderr.is_terminal:
            return  # a log or a pipe gets results and errors only: an error stays one line
        if self._bar is not None:
            out.info(text)
        elif self._status is None:
            self._status = out.stderr.status(text)
            self._status.start()
        else:
            self._status.update(text)

    @contextlib.contextmanager
    def progress(self, description: str, total: int):
        from rich.markup import escape

        from dpcli.cli import render as out

        if not self.enabled:
            yield lambda *args, **kwargs: None
            return
        self._stop_status()
        if self._bar is None:
            self._bar = out.progress(extra=("note",))
            self._bar.start()
        bar = self._bar
        task = bar.add_task(escape(description), total=max(total, 1), note="")

        def advance(n: int = 1, *, completed: int | None = None, note: str | None = None) -> None:
            fields = {"note": note} if note is not None else {}
            if completed is not None:
                bar.update(task, completed=completed, **fields)
            else:
                bar.update(task, advance=n, **fields)

        yield advance
        done = next(t.completed for t in bar.tasks if t.id == task) or max(total, 1)
        bar.update(task, total=done, completed=done)

    def warn(self, text: str) -> None:
        from dpcli.cli import render as out

        if self.enabled:
            out.warn(text)
