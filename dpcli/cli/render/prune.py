"""``dp prune``: before/after table per layer, then totals."""

from __future__ import annotations

from rich.table import Table

from dpcli.cli.render import fmt_channels, fmt_count, fmt_int, fmt_pct, key_value_table, stdout


def render_prune(report: dict) -> None:
    """Before/after table per layer, then totals."""
    layout = ""
    if report.get("level_widths"):
        layout = f", diffusers layout: level widths {report['level_widths']}"
    table = Table(
        title=f"Pruned with {report['criterion']} (ratio {report['ratio']:.3f}{layout})", title_justify="left"
    )
    for column, justify in (
        ("module", "left"),
        ("type", "left"),
        ("out kept/orig", "right"),
        ("sparsity", "right"),
        ("params before → after", "right"),
        ("MACs before → after", "right"),
    ):
        table.add_column(column, justify=justify, overflow="fold")
    for row in report["layers"]:
        channels = ""
        if row.get("original_out_channels") is not None:
            channels = fmt_channels(row.get("out_channels"), row["original_out_channels"])
        elif row.get("original_heads") is not None:
            channels = f"{row.get('heads')}/{row['original_heads']} heads"
        table.add_row(
            row["name"],
            row["type"],
            channels,
            fmt_pct(row.get("sparsity")) if row.get("sparsity") is not None else "",
            f"{fmt_count(row['params_before'])} → {fmt_count(row['params_after'])}",
            f"{fmt_count(row['macs_before'])} → {fmt_count(row['macs_after'])}",
        )
    stdout.print(table)
    totals = [
        (
            "params",
            f"{fmt_int(report['params_before'])} → {fmt_int(report['params_after'])} "
            f"({fmt_pct(report['params_fraction'])} kept)",
        ),
        (
            "MACs",
            f"{fmt_count(report['macs_before'], 'MAC')} → {fmt_count(report['macs_after'], 'MAC')} "
            f"({fmt_pct(report['macs_fraction'])} kept)",
        ),
        ("ratio", f"{report['ratio']:.4f} per layer" + (" (searched)" if report["trials"] else "")),
    ]
    if report.get("target_macs") is not None:
        totals.append(
            ("target", f"{fmt_pct(report['target_macs'])} of MACs; got {fmt_pct(report['macs_fraction'])}")
        )
    if report.get("target_params") is not None:
        totals.append(
            (
                "target",
                f"{fmt_pct(report['target_params'])} of params; got {fmt_pct(report['params_fraction'])}",
            )
        )
    if report.get("cutoff") is not None:
        totals.append(("cutoff", f"timestep {report['cutoff']}"))
    totals.append(("output", report["output"]))
    stdout.print(key_value_table("Totals", totals))
