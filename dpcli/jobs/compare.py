"""The compare job (``dp compare`` is a thin shell over it): ``compare`` puts several models (sampled here,
or read from earlier ``dp eval`` reports) side by side."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.conditions import ConditioningRequest, Conditions, conditions_from_record
from dpcli.errors import BadSetting
from dpcli.io.eval_report import GRID_FILE, read_eval_report
from dpcli.jobs.measure import (
    LatencySettings,
    Progress,
    check_same_noise,
    measure_latencies,
    measure_latency,
    model_summary,
    resolve_sampling_conditions,
    sample_model,
    with_conditions,
)
from dpcli.jobs.protocol import describe_difference, protocol_differences
from dpcli.metrics import ssim_psnr
from dpcli.reporting import Reporter, silent
from dpcli.runtime import is_main_process
from dpcli.sampling import Sampler, SamplerSettings


@dataclass
class CompareSettings:
    models: list[str] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)
    num_samples: int = 8
    sampling: SamplerSettings = field(default_factory=SamplerSettings)
    latency: LatencySettings | None = field(default_factory=LatencySettings)
    device: str | None = None
    scheduler: Path | None = None  # replaces the scheduler of every model sampled here
    conditioning: ConditioningRequest = field(default_factory=ConditioningRequest)
    mixed_protocols: bool = False  # compare reports evaluated under different protocols (flagged per row)
    retime_reports: bool = False  # time the reports' models here, round-robin with the live ones


@dataclass
class Entry:
    """One model in a comparison: measured here, or read from a dp eval report."""

    summary: dict
    sampling: dict
    latency: dict | None
    images: torch.Tensor | None
    report_path: str | None = None
    fid: float | None = None
    clip_score: float | None = None
    protocol: dict | None = None
    protocol_note: str | None = None
    samples_grid: str | None = None  # the report's grid of samples (reports only)


def sampling_from_report(report: dict, base: SamplerSettings) -> SamplerSettings:
    """The sampler settings a report was made with (so live models sample from the same noise)."""
    recorded = report.get("sampling") or {}
    return SamplerSettings(
        sampler=recorded.get("sampler", base.sampler),
        steps=int(recorded.get("steps", base.steps)),
        spacing=recorded.get("spacing", base.spacing),
        seed=int(recorded.get("seed", base.seed)),
        batch_size=base.batch_size,
        precision=base.precision,
        guidance_scale=float(recorded.get("guidance_scale", base.guidance_scale)),
        options=dict(base.options),
    )


def request_from(conditions: Conditions) -> ConditioningRequest:
    """A request that resolves to ``conditions`` (to check that a model can sample with a report's)."""
    return ConditioningRequest(
        prompts=list(conditions.prompts or []),
        negative_prompt=conditions.negative_prompt,
        guidance_scale=conditions.guidance_scale if conditions.kind != "none" else None,
        class_labels=list(conditions.class_labels or []),
    )


def check_protocols(read: list, mixed: bool) -> list[str | None]:
    """A note per report on its protocol against the first report's; refuses (BadSetting) reports whose
    protocols differ in anything but versions, unless ``mixed``."""
    first_file = first = None
    notes: list[str | None] = []
    for report, _, file in read:
        protocol = report.get("protocol")
        if protocol is None:
            notes.append("no protocol recorded (a report of an older dp): its numbers cannot be checked")
            continue
        if first is None:
            first_file, first = file, protocol
            notes.append(None)
            continue
        different, versions = protocol_differences(first, protocol)
        if different and not mixed:
            raise BadSetting(
                "reports",
                "{reports} {a} and {b} were evaluated under different protocols ({what}): their FID and CLIP "
                "scores are not comparable; pass {mixed_protocols} to compare them anyway",
                a=first_file,
                b=file,
                what="; ".join(describe_difference(key, first, protocol) for key in different),
            )
        parts = []
        if different:
            parts.append(
                "PROTOCOL DIFFERS from the first report: "
                + "; ".join(describe_difference(key, first, protocol) for key in different)
            )
        if versions:
            parts.append(
                "other versions: " + "; ".join(describe_difference(k, first, protocol) for k in versions)
            )
        notes.append(". ".join(parts) or None)
    return notes


@dataclass
class CompareReport:
    """What ``compare`` returns: ``fields``, the JSON-ready comparison (compare.json, ``dp compare --json``,
    through ``to_json()``), with the grid rows (one per model, same sample indices) beside it."""

    fields: dict
    grid_rows: list
    grid_captions: list | None = None

    def to_json(self) -> dict:
        return self.fields


def run(
    settings: CompareSettings,
    *,
    explicit_sampling: bool = False,
    output: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> CompareReport | None:
    """The compare job: ``settings.models`` (what ``dp`` accepts as MODEL, or loaded models) sampled from
    the same noise, then ``settings.reports``; report.json and the grid written to ``output`` (locked,
    atomically; a non-empty folder needs ``force``). Returns the comparison on rank 0, None elsewhere.

    With reports and no explicit sampling options, live models sample with the first report's settings.
    """
    from dpcli.io.files import AtomicFolder, output_lock, prepare_output
    from dpcli.runtime import start_distributed

    reporter = silent(reporter)
    with contextlib.ExitStack() as stack:
        if output is not None:
            stack.enter_context(output_lock(Path(output), on_note=reporter.warn))
            prepare_output(Path(output), force)
        dist = start_distributed()
        stack.callback(dist.close)
        shown = reporter if dist.is_main else Reporter()
        result = compare_models(settings, shown.progress, shown.status, explicit_sampling)
        if result is not None and output is not None:
            with AtomicFolder(Path(output), force=force) as folder:
                write_compare_output(result, folder, final=Path(output))
    return result


def compare_models(
    settings: CompareSettings, progress: Progress, status, explicit_sampling: bool
) -> CompareReport | None:
    """Sample the live models (in order), read the reports, and compare them: the report on rank 0."""
    from dpcli.adapters.base import LoadedModel
    from dpcli.loading import load_model

    if len(settings.models) + len(settings.reports) < 2:
        raise BadSetting(
            "reports", "dp compare needs at least two models (MODEL arguments and/or {reports} files)"
        )
    if settings.num_samples < 1:
        raise BadSetting("num_samples", "{num_samples} must be at least 1", got=settings.num_samples)
    if settings.latency is not None:
        settings.latency.validate()
    elif settings.retime_reports:
        raise BadSetting(
            "retime_reports", "{retime_reports} times the models: it cannot go with --no-latency"
        )
    read = [read_eval_report(path) for path in settings.reports]
    protocol_notes = check_protocols(read, settings.mixed_protocols)
    sampling = settings.sampling
    reported = None  # the conditions of the first report, when live models sample with its settings
    if read and not explicit_sampling:
        sampling = sampling_from_report(read[0][0], sampling)
        if settings.models:
            reported = conditions_from_record(read[0][0].get("protocol"))
    sampling.validate()

    entries: list[Entry] = []
    timed: list = []  # the samplers timed together at the end (--retime-reports)
    retimed = []  # the reports' models, loaded (and checked) before any sampling
    if settings.retime_reports and is_main_process():
        retimed = [report_sampler(report, file, settings, status) for report, _, file in read]
    first_loaded = None
    conditions = reported
    for spec in settings.models:
        if isinstance(spec, LoadedModel):
            loaded = spec
        else:
            status(f"Loading {spec}")
            loaded = load_model(spec, scheduler=settings.scheduler)
        request = settings.conditioning if reported is None else request_from(reported)
        if first_loaded is None:
            first_loaded = loaded
            resolved = resolve_sampling_conditions(loaded, request)
            conditions = reported or resolved
            sampling = with_conditions(sampling, conditions)
        else:
            check_same_noise(first_loaded, loaded, what="model")
            resolve_sampling_conditions(first_loaded, request, [loaded])
        summary = model_summary(loaded)
        sampler, samples = sample_model(loaded, sampling, settings.num_samples, settings.device, progress)
        if not is_main_process():
            continue
        latency = None
        if settings.retime_reports:
            timed.append(sampler)  # timed below with the reports' models, so it stays on the device
        elif settings.latency:
            latency = measure_latency(sampler, settings.latency, progress)
        summary["image_shape"] = list(samples.images.shape[1:])
        entries.append(Entry(summary, samples.describe(), latency, samples.images))
        if not settings.retime_reports:
            loaded.model.to("cpu")
    if not is_main_process():
        return None
    for (report, images, file), note in zip(read, protocol_notes, strict=True):
        summary = {k: report.get(k) for k in ("model", "adapter", "params", "macs", "blocks", "image_shape")}
        entries.append(
            Entry(
                summary,
                report.get("sampling") or {},
                report.get("latency"),
                images,
                str(file),
                report.get("fid"),
                report.get("clip_score"),
                report.get("protocol"),
                note,
                report_grid(report, file),
            )
        )
    if settings.retime_reports:
        timed += retimed
        for entry, latency in zip(entries, measure_latencies(timed, settings.latency, progress), strict=True):
            entry.latency = {**latency, "timed_together": len(timed)}
    if conditions is None and read:
        conditions = conditions_from_record(read[0][0].get("protocol"), for_sampling=False)
    return compare_entries(entries, settings.num_samples, conditions)


def report_sampler(report: dict, file: Path, settings: CompareSettings, status) -> Sampler:
    """A sampler of the model a dp eval report measured, loaded again with the report's sampling settings
    and conditions, to time it beside the others (``--retime-reports``)."""
    from dpcli.errors import BadInput, DpError
    from dpcli.loading import load_model

    spec = report.get("model")
    if not spec:
        raise BadInput(
            f"{file}: the report does not say which model it measured, so it cannot be timed again"
        )
    status(f"Loading {spec} (from {file}) to time it")
    try:
        loaded = load_model(spec, scheduler=settings.scheduler)
    except DpError as error:
        raise BadInput(f"{file}: its model {spec} cannot be loaded to time it again: {error}") from None
    summary = model_summary(loaded)
    for key in ("params", "macs"):
        if report.get(key) is not None and summary.get(key) != report.get(key):
            raise BadInput(
                f"{file}: {spec} is no longer the model the report measured ({key} {summary.get(key):,} now, "
                f"{report[key]:,} in the report)"
            )
    sampling = sampling_from_report(report, settings.sampling)
    conditions = conditions_from_record(report.get("protocol"))
    if conditions is not None:
        sampling = with_conditions(sampling, conditions)
    return Sampler(loaded, sampling, settings.device)


def report_grid(report: dict, file: Path) -> str | None:
    """Where a dp eval report's grid of samples is (beside the report), when it is there."""
    grid = file.parent / ((report.get("files") or {}).get("grid") or GRID_FILE)
    return str(grid) if grid.is_file() else None


def _same_noise(a: Entry, b: Entry) -> bool:
    keys = ("sampler", "seed", "timesteps", "guidance_scale", "conditions_sha256")
    return all(a.sampling.get(k) == b.sampling.get(k) for k in keys) and a.summary.get(
        "image_shape"
    ) == b.summary.get("image_shape")


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def compare_entries(
    entries: list[Entry], num_samples: int, conditions: Conditions | None = None
) -> CompareReport:
    """Side-by-side numbers relative to the first entry, and the grid rows (same indices per column), each
    column captioned with its prompt or class when ``conditions`` has them."""
    first = entries[0]
    rows = []
    models = []
    for position, entry in enumerate(entries):
        latency = entry.latency or {}
        base = first.latency or {}
        speedup_1 = _ratio(base.get("batch_1_ms"), latency.get("batch_1_ms"))
        same_batch = base.get("batch") == latency.get("batch")
        speedup_batch = _ratio(base.get("batch_ms"), latency.get("batch_ms")) if same_batch else None
        macs_ratio = _ratio(first.summary.get("macs"), entry.summary.get("macs"))
        row = {
            **entry.summary,
            "from_report": entry.report_path,
            "baseline": position == 0,
            "latency": entry.latency,
            "images_per_second": entry.sampling.get("images_per_second"),
            "macs_fraction": _ratio(entry.summary.get("macs"), first.summary.get("macs")),
            "macs_ratio": macs_ratio,
            "speedup_batch_1": speedup_1,
            "speedup_batch": speedup_batch,
            "speedup_per_macs_ratio_batch_1": _ratio(speedup_1, macs_ratio),
            "speedup_per_macs_ratio_batch": _ratio(speedup_batch, macs_ratio),
            "ssim": None,
            "psnr": None,
            "consistency_note": None,
            "fid": entry.fid,
            "clip_score": entry.clip_score,
            "protocol": entry.protocol,
            "protocol_note": entry.protocol_note,
            "samples_grid": entry.samples_grid,
        }
        if position > 0:
            if first.images is None or entry.images is None:
                row["consistency_note"] = "no samples to pair (report without samples.safetensors)"
            elif not _same_noise(first, entry):
                row["consistency_note"] = (
                    "sampled with other settings (seed, sampler, timesteps, guidance, prompts or labels) "
                    "than the first"
                )
            else:
                count = min(len(first.images), len(entry.images), num_samples)
                metrics = ssim_psnr(entry.images[:count], first.images[:count])
                row["ssim"], row["psnr"] = metrics["ssim"], metrics["psnr"]
        models.append(row)
        if entry.images is not None:
            rows.append(entry.images[:num_samples])
        else:
            rows.append(torch.zeros((0, 1, 1, 1), dtype=torch.uint8))
    fields = {
        "format": "dpcli-compare",
        "dpcli_version": __version__,
        "baseline": first.summary.get("model"),
        "num_samples": num_samples,
        "sampling": first.sampling,
        "conditioning": conditions.record() if conditions is not None else None,
        "models": models,
        "output": None,
        "grid": None,
    }
    columns = max((len(row) for row in rows), default=0)
    captions = None
    if conditions is not None and conditions.period:
        captions = [conditions.caption(index) for index in range(columns)]
    return CompareReport(fields, rows, captions)


def write_compare_output(result: CompareReport, folder: Path, final: Path | None = None) -> CompareReport:
    """Write compare.json and grid.png (one row per model) into ``folder`` (an AtomicFolder path)."""
    from dpcli.plots import save_image_grid

    folder = Path(folder)
    final = Path(final) if final is not None else folder
    grid = save_image_grid(result.grid_rows, folder / GRID_FILE, captions=result.grid_captions)
    result.fields["grid"] = {**grid, "path": str(final / GRID_FILE)}
    result.fields["output"] = str(final)
    (folder / "compare.json").write_text(json.dumps(result.to_json(), indent=2, allow_nan=False))
    return result
