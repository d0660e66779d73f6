"""Terminal output for the ``dp`` commands: consoles, JSON mode, errors, progress bars, number formatting.

Jobs return reports; commands render their ``to_json()`` data with the module of their name in this
package (``render.score.render_score``, ...). Tables and summaries go to stdout, progress and log lines to
stderr, so ``--json`` leaves exactly one JSON object on stdout.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# Pipes and CI logs get a wide console so tables are not folded into unreadable columns.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Write ``data`` as one JSON object on stdout (and nothing else there)."""
    sys.stdout.write(
        json.dumps(data, indent=2, default=_json_default, allow_nan=False, ensure_ascii=False) + "\n"
    )
    sys.stdout.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_safe(value: float | None) -> float | None:
    """Floats as JSON allows them: NaN/inf become None."""
    if value is None or not math.isfinite(value):
        return None
    return value


def error(message: str) -> None:
    stderr.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)


def info(message: str) -> None:
    stderr.print(escape(message), style="dim")


def warn(message: str) -> None:
    stderr.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)


def progress(transient: bool = False, extra: Sequence[str] = ()) -> Progress:
    """A rich progress bar on stderr: description, bar, M/N, elapsed, ETA, then extra fields by name.

    When stderr is not a terminal (a batch log, CI) the bar becomes plain log lines, one per 5 % of each
    task, so a long job shows where it is in its log."""
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in extra),
    ]
    if not stderr.is_terminal:
        return LogLinesProgress(*columns, console=stderr, extra=extra)
    return Progress(*columns, console=stderr, transient=transient)


class LogLinesProgress(Progress):
    """A Progress that draws nothing live and writes a line to stderr each time a task passes a 5 % mark."""

    STEPS = 20

    def __init__(self, *columns, console: Console, extra: Sequence[str] = ()):
        super().__init__(*columns, console=console, disable=True)
        self._extra = tuple(extra)
        self._logged: dict[Any, int] = {}

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id) -> None:
        task = self._tasks[task_id]
        if not task.total:
            return
        mark = int(self.STEPS * min(task.completed, task.total) / task.total)
        if mark <= self._logged.get(task_id, 0):
            return
        self._logged[task_id] = mark
        elapsed = task.elapsed or 0.0
        # Linear ETA from the whole run so far: steady for work that reports progress in chunks.
        eta = elapsed * (task.total - task.completed) / task.completed
        parts = [
            Text.from_markup(task.description).plain,
            f"{task.completed:g}/{task.total:g} ({task.percentage:.0f} %)",
            f"elapsed {fmt_seconds(elapsed)}",
            *(() if task.finished else (f"ETA {fmt_seconds(eta)}",)),
            *(str(task.fields.get(name, "")) for name in self._extra),
        ]
        self.console.print(
            "  ".join(part for part in parts if part), style="dim", soft_wrap=True, markup=False
        )


def fmt_count(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M' (with unit appended, e.g. 'MAC')."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}".rstrip()
    return f"{value:.0f} {unit}".rstrip() if float(value).is_integer() else f"{value:.3g} {unit}".rstrip()


def fmt_int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"


def key_value_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def fmt_channels(value: int | None, original: int | None) -> str:
    if value is None:
        return ""
    if original is None or original == value:
        return str(value) if original is None else f"{value}/{original}"
    return f"[bold]{value}[/]/{original}"


@contextmanager
def progress_tasks(enabled: bool = True):
    """One progress display for a command with several stages. Yields ``task(description, total)``,
    a context manager that adds a bar and yields ``advance(n=1)``. Disabled: nothing is shown."""
    if not enabled:
        yield lambda description, total: nullcontext(lambda n=1: None)
        return
    with progress() as bar:

        @contextmanager
        def task(description: str, total: int):
            task_id = bar.add_task(escape(description), total=max(total, 1))
            yield lambda n=1: bar.advance(task_id, n)
            bar.update(task_id, completed=max(total, 1))

        yield task


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} ms" if value < 1000 else f"{value / 1000:.3g} s"


def fmt_psnr(value: float | None) -> str:
    from dpcli.metrics import PSNR_IDENTICAL

    if value is None:
        return "-"
    return "∞ (identical)" if value >= PSNR_IDENTICAL else f"{value:.2f} dB"


def fmt_ratio(value: float | None, suffix: str = "×") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"
