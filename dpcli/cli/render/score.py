"""``dp score``: the loss curve with its cutoff, and per-group score statistics."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from dpcli.cli.render import fmt_seconds, stdout


def render_score(report: dict) -> None:
    """Loss curve (sparkline) with the cutoff, and per-group score statistics."""
    losses = report["losses"]
    stride = report.get("timestep_stride") or 1
    plan = report.get("scan_budget")
    if plan:
        stdout.print(
            f"scan budget {plan['scan_budget']:,} samples: chose --timestep-stride {plan['timestep_stride']} "
            f"and --calib-size {plan['calib_size']}: about {plan['estimated_samples']:,} samples with the "
            f"cutoff near t = {plan['estimated_cutoff']} that a forward-only pilot of {plan['pilot_samples']:,} "
            "samples found"
        )
    if losses:
        every = f"t = 0, {stride}, {2 * stride}, ..." if stride > 1 else "every timestep"
        stdout.print(
            f"[bold]{report['criterion']}[/]: scanned {report['timesteps_scanned']} of "
            f"{report['timesteps_total']} timesteps ({every}) in {fmt_seconds(report['scan_seconds'])}: "
            f"{report['samples']:,} samples in {report['forward_passes']} forward+backward passes "
            f"({report['chunk']} timesteps × {report['calib_size']} images each); cutoff t = {report['cutoff']}"
            + (f" (threshold {report['threshold']})" if report.get("threshold") else "")
        )
        stdout.print(sparkline(losses, mark=report["cutoff"] // stride, stride=stride))
        stdout.print(
            f"loss at t=0: {losses[0]:.4g}, max: {max(v for v in losses if v is not None):.4g}, "
            f"at cutoff: {losses[-1]:.4g}"
        )
    else:
        stdout.print(f"[bold]{report['criterion']}[/]: no timestep scan needed (data-free criterion)")
    table = Table(title=f"Scores per group ({report['groups']} groups)", title_justify="left")
    for column, justify in (
        ("group", "left"),
        ("channels", "right"),
        ("min", "right"),
        ("mean", "right"),
        ("max", "right"),
        ("std", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in report["layers"]:
        table.add_row(
            row["group"],
            str(row["channels"]),
            f"{row['min']:.3g}",
            f"{row['mean']:.3g}",
            f"{row['max']:.3g}",
            f"{row['std']:.3g}",
        )
    stdout.print(table)
    if report.get("output"):
        stdout.print(f"scores written to [bold]{escape(report['output'])}[/] (reuse: dp prune --scores)")
    if report.get("plot"):
        stdout.print(f"loss curve written to [bold]{escape(report['plot'])}[/]")


def sparkline(values: list, mark: int | None = None, width: int = 60, stride: int = 1) -> str:
    """A one-line chart of ``values`` (log scale), the entry at index ``mark`` (the cutoff) in red;
    entry i is timestep i × ``stride``."""
    finite = [v for v in values if v is not None and v > 0]
    if not finite:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, math.ceil(len(values) / width))
    low, high = math.log(min(finite)), math.log(max(finite))
    cells = []
    for start in range(0, len(values), step):
        window = [v for v in values[start : start + step] if v is not None and v > 0]
        level = 0 if not window or high == low else int((math.log(max(window)) - low) / (high - low) * 7)
        char = bars[level]
        if mark is not None and start <= mark < start + step:
            char = f"[red]{char}[/]"
        cells.append(char)
    return f"t=0 {''.join(cells)} t={(len(values) - 1) * stride}"
