"""All terminal output: consoles, JSON mode, errors, progress bars, number formatting, tables.

Commands compute plain data (dicts); this module renders it. Tables and summaries go to stdout,
progress and log lines to stderr, so ``--json`` leaves exactly one JSON object on stdout.
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
    """A rich progress bar on stderr: description, bar, M/N, elapsed, ETA, then extra fields by name."""
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in extra),
    ]
    return Progress(*columns, console=stderr, transient=transient)


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


def render_plugins(data: dict) -> None:
    """Table of installed criteria and adapters, then plugin-level failures."""
    table = Table(title="dp plugins", title_justify="left")
    for column in ("kind", "name", "description", "package", "version", "origin", "status"):
        table.add_column(column)
    for row in data["criteria"] + data["adapters"]:
        status = (
            "[green]ok[/]"
            if row["status"] == "ok"
            else f"[red]{row['status']}[/]: {escape(row['error'] or '')}"
        )
        table.add_row(
            row["kind"],
            row["name"],
            escape(row["description"]),
            row["package"],
            row["version"],
            "built-in" if row["builtin"] else "third-party",
            status,
        )
    stdout.print(table)
    for plugin in data["plugins"]:
        if plugin["status"] == "failed":
            stdout.print(
                f"[red]failed plugin[/] {plugin['name']} ({plugin['package']} {plugin['version']}): "
                f"{escape(plugin['error'] or '')}"
            )
        elif plugin["status"] == "disabled":
            stdout.print(f"[yellow]disabled[/] {plugin['name']} ({plugin['package']} {plugin['version']})")


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
        out = _channels(layer.get("out_channels"), layer.get("original_out_channels") if pruned else None)
        row = [layer["name"], layer["type"], _channels(layer.get("in_channels"), None), out]
        if pruned:
            row.append(fmt_pct(layer.get("sparsity")) if layer.get("sparsity") is not None else "")
        row += [fmt_count(layer["params"]), fmt_count(layer["macs"]), fmt_pct(layer["macs"] / total_macs)]
        table.add_row(*row)
    stdout.print(table)


def _channels(value: int | None, original: int | None) -> str:
    if value is None:
        return ""
    if original is None or original == value:
        return str(value) if original is None else f"{value}/{original}"
    return f"[bold]{value}[/]/{original}"


def render_score(report: dict) -> None:
    """Loss curve (sparkline) with the cutoff, and per-group score statistics."""
    losses = report["losses"]
    if losses:
        stdout.print(
            f"[bold]{report['criterion']}[/]: scanned {report['timesteps_scanned']} of "
            f"{report['timesteps_total']} timesteps in {fmt_seconds(report['scan_seconds'])} "
            f"({report['forward_passes']} forward passes, {report['chunk']} timesteps × "
            f"{report['calib_size']} images each); cutoff t = {report['cutoff']}"
            + (f" (threshold {report['threshold']})" if report.get("threshold") else "")
        )
        stdout.print(sparkline(losses, mark=report["cutoff"]))
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


def sparkline(values: list, mark: int | None = None, width: int = 60) -> str:
    """A one-line chart of ``values`` (log scale), the cutoff position marked with a red bar."""
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
    return f"t=0 {''.join(cells)} t={len(values) - 1}"


def render_prune(report: dict) -> None:
    """Before/after table per layer, then totals."""
    table = Table(
        title=f"Pruned with {report['criterion']} (ratio {report['ratio']:.3f})", title_justify="left"
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
            channels = _channels(row.get("out_channels"), row["original_out_channels"])
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


def render_finetune(report: dict) -> None:
    """Summary of a ``dp finetune`` run."""
    resumed = f" (resumed at step {report['resumed_from']})" if report.get("resumed_from") else ""
    speed = report.get("steps_per_second")
    rows = [
        ("steps", f"{fmt_int(report['steps'])}{resumed}"),
        (
            "global batch",
            f"{report['global_batch']} = {report['batch_size']} × {report['world_size']} process(es) × "
            f"{report['grad_accum']} accumulation step(s)",
        ),
        (
            "optimizer",
            f"AdamW lr {report['lr']:g}, {report['schedule']} after {report['warmup']} warmup steps, "
            f"EMA {report['ema_decay']}, grad clip {report['grad_clip'] or 'off'}",
        ),
        ("precision", f"{report['precision']} on {report['device']}"),
        (
            "loss",
            f"{report['initial_loss']:.4f} → {report['final_loss']:.4f} "
            f"(mean of the first / last {report['loss_window']} steps)",
        ),
        (
            "time",
            f"{fmt_seconds(report['seconds'])}" + (f", {speed:.2f} steps/s" if speed else ""),
        ),
    ]
    if report.get("teacher"):
        rows.append(("teacher", f"{report['teacher']} (distillation weight {report['distill_weight']})"))
    if report.get("reinit"):
        rows.append(("init", "re-initialised (trained from scratch)"))
    rows += [
        ("output", f"{report['output']} (EMA weights; raw weights in unet/raw.safetensors)"),
        ("loss curve", report["loss_curve"]),
    ]
    if report.get("samples"):
        rows.append(("samples", report["samples"]))
    rows.append(("checkpoints", report["checkpoints"]))
    stdout.print(key_value_table("Fine-tuned", rows))


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


def _sampling_text(sampling: dict) -> str:
    return (
        f"{sampling['sampler']}, {sampling['steps']} steps {sampling['spacing']} "
        f"({sampling['model_evaluations']} model evaluations), seed {sampling['seed']}, "
        f"{sampling['num_samples']} images, batch {sampling['batch_size']}, {sampling['device']} "
        f"{sampling['precision']}"
        + (f", {sampling['world_size']} processes" if sampling["world_size"] > 1 else "")
    )


def _latency_text(latency: dict | None) -> str:
    if not latency:
        return "not measured"
    text = f"{fmt_ms(latency['batch_1_ms'])} per step at batch 1"
    if latency["batch"] > 1:
        text += f", {fmt_ms(latency['batch_ms'])} at batch {latency['batch']}"
    return text + f" (median of {latency['repeats']}, {latency['warmup']} warm-up excluded)"


def render_eval(report: dict) -> None:
    """Summary of ``dp eval``: size, sampling, latency, FID, SSIM/PSNR to the reference, files."""
    sampling = report["sampling"]
    rows = [
        ("params", f"{fmt_int(report['params'])} ({fmt_count(report['params'])})"),
        ("MACs", f"{fmt_count(report['macs'], 'MAC')} per forward at batch 1"),
        ("sampling", _sampling_text(sampling)),
        ("latency", _latency_text(report["latency"])),
        (
            "throughput",
            f"{sampling['images_per_second']:.3g} images/s for the full sampler "
            f"({sampling['num_samples']} images in {fmt_seconds(sampling['seconds'])})",
        ),
    ]
    info = report["fid_info"]
    if report["fid"] is not None:
        rows.append(
            (
                "FID",
                f"{report['fid']:.3f} ({info['extractor']} features, {info['features']} wide; "
                f"{info['samples']} samples vs {info['reference']}, {info['reference_count']} images)",
            )
        )
    else:
        rows.append(("FID", f"unavailable: {info['unavailable']}"))
    reference = report.get("reference")
    if reference:
        rows.append(
            (
                "reference",
                f"{reference['model']} ({fmt_count(reference['params'])} params, "
                f"{fmt_count(reference['macs'], 'MAC')}; MACs kept {fmt_pct(report['macs'] / reference['macs'])})",
            )
        )
        rows.append(("SSIM", f"{report['ssim']:.4f} to the reference, same noise, paired by index"))
        rows.append(("PSNR", fmt_psnr(report["psnr"])))
    if report.get("stats_file"):
        rows.append(("FID stats", f"written to {report['stats_file']}"))
    if report.get("output"):
        rows.append(("output", f"{report['output']} (report.json, grid.png, samples.safetensors)"))
    stdout.print(key_value_table(f"Evaluation: {report['model']}", rows))
    if not report.get("output"):
        stdout.print("[dim]pass --output DIR to keep the report, the sample grid and the samples[/]")


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
    names = []
    for model in models:
        for block in model.get("blocks") or []:
            if block["name"] not in names:
                names.append(block["name"])
    for name in names:
        cells = []
        for model in models:
            block = next((b for b in model.get("blocks") or [] if b["name"] == name), None)
            cells.append("-" if block is None else _channels(block["width"], block.get("original")))
        add(f"width {name}", cells)
    stdout.print(table)
    for index, model in enumerate(models):
        if model.get("consistency_note"):
            stdout.print(
                f"[dim]{index + 1}. {escape(model['model'] or '?')}: {escape(model['consistency_note'])}[/]"
            )
    if result.get("grid"):
        grid = result["grid"]
        stdout.print(
            f"grid: [bold]{escape(grid['path'])}[/] (one row per model, the same sample index in each column)"
        )
    else:
        stdout.print("[dim]pass --output DIR to write the comparison and its image grid[/]")
