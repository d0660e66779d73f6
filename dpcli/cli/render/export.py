"""``dp export``: what was written, its inputs and outputs, and the verification."""

from __future__ import annotations

from rich.table import Table

from dpcli.cli.render import fmt_count, stdout


def render_export(report: dict) -> None:
    """Inputs/outputs table, then the file and the verification line."""
    table = Table(title=f"{report['model']} → {report['output']} ({report['format']})", title_justify="left")
    for column in ("", "name", "shape", "dtype"):
        table.add_column(column)
    for side in ("inputs", "outputs"):
        for item in report[side]:
            shape = " × ".join(str(size) for size in item["shape"])
            table.add_row(side[:-1], item["name"], shape, item["dtype"])
    stdout.print(table)
    opset = f", opset {report['opset']}" if report["opset"] is not None else ""
    stdout.print(
        f"wrote {', '.join(report['files'])} ({fmt_count(report['bytes'], 'B')}{opset}) in {report['seconds']:.1f} s"
    )
    runtime = "onnxruntime (CPU)" if report["format"] == "onnx" else "torch.jit"
    stdout.print(
        f"verified with {runtime} at batch {report['verified_batch']}: max abs difference "
        f"{report['max_abs_diff']:.3g} (tolerance {report['tolerance']:g})"
    )
