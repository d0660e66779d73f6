"""``dp compare``: models side by side."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from dpcli.cli.render import fmt_channels, fmt_count, fmt_ms, fmt_pct, fmt_psnr, fmt_ratio, stdout


def render_compare(result: dict) -> None:
    """One table, models side by side (the first is the baseline), then where the grid went."""
    models = result["models"]
    table = Table(title=f"Compared with {result['baseline']} (baseline)", title_justify="left")
    table.add_column("")
    for index, model in enumerate(models):
        label = model["model"] or "?"
        table.add_column(
            escape(f"{index + 1}. {label}") + (" [dim](report)[/]" if model["from_report"] else ""),
            justify="right",
            overflow="fold",
        )
    batch = next((m["latency"]["batch"] for m in models if m.get("latency")), None)

    def add(name: str, values: list[str]) -> None:
        table.add_row(name, *values)

    add("params", [fmt_count(m["params"]) for m in models])
    add("MACs", [fmt_count(m["macs"], "MAC") for m in models])
    add("MACs kept", [fmt_pct(m["macs_fraction"]) for m in models])
    add("MACs ratio", [fmt_ratio(m["macs_ratio"]) for m in models])
    add("ms/step, batch 1", [fmt_ms((m.get("latency") or {}).get("batch_1_ms")) for m in models])
    if batch and batch > 1:
        add(f"ms/step, batch {batch}", [fmt_ms((m.get("latency") or {}).get("batch_ms")) for m in models])
    add("speedup, batch 1", [fmt_ratio(m["speedup_batch_1"]) for m in models])
    if batch and batch > 1:
        add(f"speedup, batch {batch}", [fmt_ratio(m["speedup_batch"]) for m in models])
    add("speedup / MACs ratio, batch 1", [fmt_ratio(m["speedup_per_macs_ratio_batch_1"], "") for m in models])
    if batch and batch > 1:
        add(
            f"speedup / MACs ratio, batch {batch}",
            [fmt_ratio(m["speedup_per_macs_ratio_batch"], "") for m in models],
        )
    add(
        "images/s (sampler)",
        [f"{m['images_per_second']:.3g}" if m.get("images_per_second") else "-" for m in models],
    )
    add(
        "SSIM to 1st",
        [
            "baseline" if m["baseline"] else (f"{m['ssim']:.4f}" if m["ssim"] is not None else "-")
            for m in models
        ],
    )
    add("PSNR to 1st", ["baseline" if m["baseline"] else fmt_psnr(m["psnr"]) for m in models])
    if any(m.get("fid") is not None for m in models):
        add("FID (from report)", [f"{m['fid']:.3f}" if m.get("fid") is not None else "-" for m in models])
    if any(m.get("clip_score") is not None for m in models):
        add(
            "CLIP score (from report)",
            [f"{m['clip_score']:.3f}" if m.get("clip_score") is not None else "-" for m in models],
        )
    names = []
    for model in models:
        for block in model.get("blocks") or []:
            if block["name"] not in names:
                names.append(block["name"])
    for name in names:
        cells = []
        for model in models:
            block = next((b for b in model.get("blocks") or [] if b["name"] == name), None)
            cells.append("-" if block is None else fmt_channels(block["width"], block.get("original")))
        add(f"width {name}", cells)
    stdout.print(table)
    for index, model in enumerate(models):
        if model.get("consistency_note"):
            stdout.print(
                f"[dim]{index + 1}. {escape(model['model'] or '?')}: {escape(model['consistency_note'])}[/]"
            )
        note = model.get("protocol_note")
        if note:
            style = "bold red" if "PROTOCOL DIFFERS" in note else "dim"
            stdout.print(f"[{style}]{index + 1}. {escape(model['model'] or '?')}: {escape(note)}[/]")
    if result.get("grid"):
        grid = result["grid"]
        stdout.print(
            f"grid: [bold]{escape(grid['path'])}[/] (one row per model, the same sample index in each column"
            + (", captioned with its prompt or class)" if grid.get("captions") else ")")
        )
    else:
        stdout.print("[dim]pass --output DIR to write the comparison and its image grid[/]")


def render_compare_summary(result: dict) -> None:
    """The headline of a comparison, one row per model: size, MACs, measured speedup, FID, SSIM to the
    first, and where each model's samples are (``dp compare --summary``)."""
    models = result["models"]
    batch = next((m["latency"]["batch"] for m in models if m.get("latency")), None)
    sampling = result.get("sampling") or {}
    steps = sampling.get("steps")
    batches = f" (batch 1 and batch {batch})" if batch and batch > 1 else ""
    if any((m.get("latency") or {}).get("timed_together") for m in models):
        batches += ", every model timed in this run, one step of each in turn"
    sampler = f", {str(sampling.get('sampler', 'ddim')).upper()} {steps} steps" if steps else ""
    table = Table(
        title=f"Summary: {len(models)} models against {escape(str(result['baseline']))}",
        title_justify="left",
        caption=(
            f"speedup: measured latency of one denoising step against the first model{batches}; "
            f"SSIM: to the first model's images from the same noise ({result['num_samples']} samples{sampler}); "
            "FID: from each dp eval report"
        ),
        caption_justify="left",
    )
    table.add_column("model", overflow="fold")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("speedup, batch 1", justify="right")
    if batch and batch > 1:
        table.add_column(f"speedup, batch {batch}", justify="right")
    table.add_column("FID", justify="right")
    table.add_column("SSIM to 1st", justify="right")
    table.add_column("samples", overflow="fold")
    for model in models:
        cells = [
            escape(model["model"] or "?"),
            fmt_count(model["params"]),
            f"{fmt_count(model['macs'], 'MAC')} ({fmt_pct(model['macs_fraction'], 0)})",
            fmt_ratio(model["speedup_batch_1"]),
        ]
        if batch and batch > 1:
            cells.append(fmt_ratio(model["speedup_batch"]))
        cells += [
            f"{model['fid']:.1f}" if model.get("fid") is not None else "-",
            "baseline"
            if model["baseline"]
            else (f"{model['ssim']:.3f}" if model["ssim"] is not None else "-"),
            escape(model.get("samples_grid") or "-"),
        ]
        table.add_row(*cells)
    stdout.print(table)
    for index, model in enumerate(models):
        note = model.get("protocol_note") or model.get("consistency_note")
        if note:
            style = "bold red" if "PROTOCOL DIFFERS" in note else "dim"
            stdout.print(f"[{style}]{index + 1}. {escape(model['model'] or '?')}: {escape(note)}[/]")
    if result.get("grid"):
        stdout.print(f"side by side (one row per model): [bold]{escape(result['grid']['path'])}[/]")
