"""``dp eval``: the report's summary."""

from __future__ import annotations

from dpcli.cli.render import (
    fmt_count,
    fmt_int,
    fmt_ms,
    fmt_pct,
    fmt_psnr,
    fmt_seconds,
    key_value_table,
    stdout,
)


def _sampling_text(sampling: dict) -> str:
    return (
        f"{sampling['sampler']}, {sampling['steps']} steps {sampling['spacing']} "
        f"({sampling['model_evaluations']} model evaluations), seed {sampling['seed']}, "
        f"{sampling['num_samples']} images, batch {sampling['batch_size']}, {sampling['device']} "
        f"{sampling['precision']}"
        + (f", {sampling['world_size']} processes" if sampling["world_size"] > 1 else "")
    )


def _conditioning_text(protocol: dict) -> str | None:
    kind = protocol.get("conditioning")
    if kind in (None, "none"):
        return None
    guidance = protocol.get("guidance_scale")
    scale = "no guidance" if guidance == 1 else f"guidance {guidance:g}"
    if kind == "class":
        labels = protocol.get("class_labels") or []
        return (
            f"{len(labels)} class label(s) in turn ({', '.join(map(str, labels[:8]))}"
            + (", ...)" if len(labels) > 8 else ")")
            + f", {scale}"
        )
    prompts = protocol.get("prompts")
    if not prompts:
        text = "the empty prompt"
    elif prompts.get("file"):
        text = f"{prompts['count']} prompt(s) from {prompts['file']} (sha256 {prompts['file_sha256'][:12]})"
    else:
        text = f"{prompts['count']} prompt(s)"
    negative = protocol.get("negative_prompt")
    return text + (f", negative prompt {negative!r}" if negative else "") + f", {scale}"


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
    ]
    protocol = report.get("protocol") or {}
    conditioning = _conditioning_text(protocol)
    if conditioning:
        rows.append(("conditioning", conditioning))
    rows += [
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
    if protocol.get("conditioning") == "text":
        clip = report["clip_info"]
        if report.get("clip_score") is not None:
            rows.append(
                (
                    "CLIP score",
                    f"{report['clip_score']:.3f} ({clip['samples']} samples, CLIP {clip['model']})",
                )
            )
        else:
            rows.append(("CLIP score", f"unavailable: {clip['unavailable']}"))
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
    if protocol:
        rows.append(
            (
                "protocol",
                f"recorded in the report (dp {protocol.get('dpcli_version')}, torch {protocol.get('torch_version')})",
            )
        )
    if report.get("stats_file"):
        rows.append(("FID stats", f"written to {report['stats_file']}"))
    if report.get("output"):
        rows.append(("output", f"{report['output']} (report.json, grid.png, samples.safetensors)"))
    stdout.print(key_value_table(f"Evaluation: {report['model']}", rows))
    if not report.get("output"):
        stdout.print("[dim]pass --output DIR to keep the report, the sample grid and the samples[/]")
