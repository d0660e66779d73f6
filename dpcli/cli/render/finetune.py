"""``dp finetune``: the run's summary."""

from __future__ import annotations

from dpcli.cli.render import fmt_int, fmt_seconds, key_value_table, stdout


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
    if report.get("bad_samples"):
        bad = report["bad_samples"]
        first = ", ".join(entry["source"] for entry in bad[:3]) + (", ..." if len(bad) > 3 else "")
        rows.append(("bad samples", f"{len(bad)} skipped: {first} (all in --json)"))
    rows += [
        ("output", f"{report['output']} (EMA weights; raw weights in unet/raw.safetensors)"),
        ("loss curve", report["loss_curve"]),
    ]
    if report.get("samples"):
        rows.append(("samples", report["samples"]))
    rows.append(("checkpoints", report["checkpoints"]))
    stdout.print(key_value_table("Fine-tuned", rows))
