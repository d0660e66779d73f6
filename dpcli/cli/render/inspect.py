"""``dp inspect``: summary and per-layer table."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from dpcli.cli.render import fmt_channels, fmt_count, fmt_int, fmt_pct, key_value_table, stdout


def render_inspect(report: dict) -> None:
    """Summary and per-layer table of ``dp inspect``; shows kept/original channels for pruned models."""
    pruned = report.get("pruned") is not None
    summary = [
        ("adapter", report["adapter"]),
        ("class", report["class"]),
        ("source", f"{report['source']} ({report['source_kind']})"),
        ("params", f"{fmt_int(report['params'])} ({fmt_count(report['params'])})"),
        ("MACs", f"{fmt_count(report['macs'], 'MAC')} per forward at batch 1, {report['input_shape_text']}"),
        (
            "resolution",
            f"{report['sample_size']}x{report['sample_size']}, {report['in_channels']} channel(s)",
        ),
        ("scheduler", report.get("scheduler") or "none"),
    ]
    if pruned:
        p = report["pruned"]
        summary.insert(
            4, ("original", f"{fmt_int(p['params_before'])} params, {fmt_count(p['macs_before'], 'MAC')}")
        )
        summary.append(
            (
                "pruning",
                f"{p.get('criterion')} ({fmt_pct(p['params_after'] / p['params_before'])} "
                f"of params, {fmt_pct(p['macs_after'] / p['macs_before'])} of MACs kept)",
            )
        )
    for component in report.get("components", []):
        summary.append((component["name"], f"{component['class']}, {fmt_int(component['params'])} params"))
    stdout.print(key_value_table(f"Model: {report['source']}", summary))
    for note in report.get("notes", []):
        stdout.print(f"[dim]note: {escape(note)}[/]")

    depth = report.get("depth")
    title = "Layers" if depth is None else f"Blocks (grouped at depth {depth})"
    table = Table(title=title, title_justify="left")
    table.add_column("module", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("in", justify="right")
    table.add_column("out" + (" kept/orig" if pruned else ""), justify="right")
    if pruned:
        table.add_column("sparsity", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("% MACs", justify="right")
    total_macs = report["macs"] or 1
    for layer in report["layers"]:
        out = fmt_channels(layer.get("out_channels"), layer.get("original_out_channels") if pruned else None)
        row = [layer["name"], layer["type"], fmt_channels(layer.get("in_channels"), None), out]
        if pruned:
            row.append(fmt_pct(layer.get("sparsity")) if layer.get("sparsity") is not None else "")
        row += [fmt_count(layer["params"]), fmt_count(layer["macs"]), fmt_pct(layer["macs"] / total_macs)]
        table.add_row(*row)
    stdout.print(table)
