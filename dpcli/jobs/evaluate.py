"""The eval job: ``run`` samples a model (and a reference from the same noise), measures latency, FID, CLIP
score, SSIM and PSNR, and writes the report, grid and samples. Progress goes through a ``Reporter``
(``dpcli.reporting``); the measuring helpers are ``dpcli.jobs.measure``, shared with the compare job.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.adapters.base import LoadedModel
from dpcli.conditions import ConditioningRequest, Conditions
from dpcli.data import DataSpec
from dpcli.data.base import DataOptions
from dpcli.errors import BadInput, BadSetting
from dpcli.io.eval_report import GRID_FILE, REPORT_FILE, REPORT_FORMAT, SAMPLES_FILE, write_samples
from dpcli.jobs.measure import (
    LatencySettings,
    check_same_noise,
    clip_unavailable,
    compute_clip_score,
    compute_fid,
    fid_unavailable,
    measure_latency,
    model_summary,
    plan_clip,
    plan_fid,
    resolve_sampling_conditions,
    sample_model,
    with_conditions,
)
from dpcli.metrics import ssim_psnr
from dpcli.reporting import Reporter, silent
from dpcli.runtime import is_main_process
from dpcli.sampling import SamplerSettings, Samples

GRID_SAMPLES = 64  # at most this many images in dp eval's grid
GRID_CONDITIONS = 8  # at most this many prompts or classes (one per column) in dp eval's grid


def conditional_grid(images: torch.Tensor, conditions: Conditions) -> tuple[list, list | None]:
    """Grid rows and column captions: one column per prompt or class (the first GRID_CONDITIONS), holding
    the samples made with it (sample ``r * P + j`` in row r, column j); a square grid when unconditional."""
    from dpcli.plots import grid_rows

    period = conditions.period
    if not period:
        return grid_rows(images[:GRID_SAMPLES]), None
    columns = min(period, GRID_CONDITIONS, len(images))
    rows = []
    for row in range(max(1, GRID_SAMPLES // columns)):
        indices = [row * period + j for j in range(columns) if row * period + j < len(images)]
        if not indices:
            break
        rows.append(images[indices])
    return rows, [conditions.caption(j) for j in range(columns)]


# dp eval --------------------------------------------------------------------------------------


@dataclass
class EvalSettings(DataOptions):
    """``dp eval``'s settings, named as its options (``latency=False`` is ``--no-latency``); the sampling,
    latency and conditioning settings are built from them (``sampling``, ``latency_settings``,
    ``conditioning``)."""

    reference: str | None = None  # what the reference was loaded from (recorded)
    num_samples: int = 256
    steps: int = 100
    spacing: str = "uniform"
    sampler: str = "ddim"
    seed: int = 0
    prompt: list[str] | str | None = None  # sample i gets prompt i mod P
    prompts: Path | None = None  # a file of prompts, one a line
    negative_prompt: str | None = None
    guidance_scale: float | None = None  # None: the model's default (its diffusers pipeline's)
    class_label: list[int] | int | None = None
    clip_model: str | None = None  # a CLIP folder or cached Hub id (default: DEFAULT_CLIP_MODEL if cached)
    batch_size: int = 64
    data: DataSpec | str | Path | None = None
    fid_stats: Path | None = None
    inception_weights: Path | None = None
    save_stats: Path | None = None
    latency_batch: int = 64
    repeats: int = 5
    latency: bool = True
    device: str | None = None
    precision: str = "auto"

    def __post_init__(self):
        from dpcli.data.base import settings_data_spec

        self.data = settings_data_spec(self)
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if isinstance(self.class_label, int):
            self.class_label = [self.class_label]
        if self.clip_model is not None:
            self.clip_model = str(self.clip_model)  # recorded in the protocol as given
        for name in ("prompts", "fid_stats", "inception_weights", "save_stats"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))

    @property
    def sampling(self) -> SamplerSettings:
        """How the images are sampled, before the model's conditions are resolved."""
        return SamplerSettings(
            sampler=self.sampler,
            steps=self.steps,
            spacing=self.spacing,
            seed=self.seed,
            batch_size=self.batch_size,
            precision=self.precision,
        )

    @property
    def latency_settings(self) -> LatencySettings | None:
        return LatencySettings(batch=self.latency_batch, repeats=self.repeats) if self.latency else None

    @property
    def conditioning(self) -> ConditioningRequest:
        """What was asked for; ``resolve_conditions`` checks it against the model."""
        return ConditioningRequest(
            prompts=list(self.prompt or []),
            prompts_file=self.prompts,
            negative_prompt=self.negative_prompt,
            guidance_scale=self.guidance_scale,
            class_labels=list(self.class_label or []),
        )

    def validate(self) -> None:
        self.sampling.validate()
        if self.num_samples < 1:
            raise BadSetting("num_samples", "{num_samples} must be at least 1", got=self.num_samples)
        if self.latency_settings is not None:
            self.latency_settings.validate()


@dataclass
class EvalReport:
    """What ``evaluate`` returns: ``fields``, the JSON-ready report (what report.json holds and
    ``dp eval --json`` prints, through ``to_json()``), with the samples and grid rows beside it for the files
    ``write_eval_output`` writes."""

    fields: dict
    samples: Samples
    grid_rows: list
    grid_captions: list | None = None

    def to_json(self) -> dict:
        return self.fields


def run(
    loaded: LoadedModel,
    settings: EvalSettings,
    *,
    reference: LoadedModel | None = None,
    output: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> EvalReport | None:
    """The eval job: sample ``loaded`` (and ``reference`` from the same noise) on every torchrun process,
    measure, and write report.json, grid.png and samples.safetensors to ``output`` (locked, atomically;
    an existing non-empty folder needs ``force``, as does an existing ``settings.save_stats`` file).
    Returns the report on rank 0, None on the other ranks."""
    from dpcli.io.files import AtomicFolder, output_lock, prepare_output
    from dpcli.runtime import start_distributed

    reporter = silent(reporter)
    settings.validate()
    output = Path(output) if output is not None else None
    with contextlib.ExitStack() as stack:
        if output is not None:
            stack.enter_context(output_lock(output, on_note=reporter.warn))
            prepare_output(output, force)
        if settings.save_stats is not None:
            stack.enter_context(output_lock(settings.save_stats, on_note=reporter.warn))
            if settings.save_stats.exists() and not force:
                raise BadSetting(
                    "save_stats",
                    "{save_stats} {path} exists (use {force} to replace it)",
                    path=settings.save_stats,
                )
        dist = start_distributed()
        stack.callback(dist.close)
        report = sample_and_measure(loaded, settings, reference, reporter if dist.is_main else Reporter())
        if report is not None and output is not None:
            with AtomicFolder(output, force=force) as folder:
                write_eval_output(report, folder, final=output)
    return report


def sample_and_measure(
    loaded: LoadedModel, settings: EvalSettings, reference: LoadedModel | None, reporter: Reporter
) -> EvalReport | None:
    """Sample, then measure latency, FID, CLIP score, SSIM/PSNR: the report on rank 0, None elsewhere."""
    progress = reporter.progress
    plan = plan_fid(
        settings.data,
        settings.fid_stats,
        settings.inception_weights,
        settings.save_stats,
        settings.num_samples,
    )
    if reference is not None:
        check_same_noise(loaded, reference)
    conditions = resolve_sampling_conditions(
        loaded, settings.conditioning, [reference] if reference is not None else []
    )
    clip_folder, clip_reason = plan_clip(conditions, settings.clip_model, loaded.source)
    sampling = with_conditions(settings.sampling, conditions)
    summary = model_summary(loaded)
    reference_summary = model_summary(reference) if reference is not None else None

    sampler, samples = sample_model(loaded, sampling, settings.num_samples, settings.device, progress)
    reference_samples = None
    if reference is not None:
        _, reference_samples = sample_model(
            reference, sampling, settings.num_samples, settings.device, progress, "reference"
        )
    if not is_main_process():
        return None

    latency = measure_latency(sampler, settings.latency_settings, progress) if settings.latency else None
    consistency = {"ssim": None, "psnr": None}
    if reference_samples is not None:
        if reference_samples.images.shape != samples.images.shape:
            raise BadInput(
                f"reference {reference.source} makes images of shape {tuple(reference_samples.images.shape[1:])},"
                f" {loaded.source} {tuple(samples.images.shape[1:])}: they cannot be paired"
            )
        consistency = ssim_psnr(samples.images, reference_samples.images)
    from dpcli.data import recording

    if plan is not None:
        with recording() as bad_samples:
            fid, fid_info = compute_fid(plan, loaded, samples, progress, device=sampler.device)
    else:
        fid, fid_info = None, fid_unavailable("no reference images: pass --data D or --fid-stats FILE")
    if clip_folder is not None:
        clip, clip_info = compute_clip_score(
            clip_folder, samples, conditions, progress, device=sampler.device
        )
    else:
        clip, clip_info = None, clip_unavailable(clip_reason)
    from dpcli.jobs.protocol import build_protocol

    image_shape = list(samples.images.shape[1:])
    protocol = build_protocol(
        sampling, settings.num_samples, conditions, image_shape, plan, clip_folder, settings.clip_model
    )
    fields = {
        "format": REPORT_FORMAT,
        "dpcli_version": __version__,
        **summary,
        "image_shape": image_shape,
        "sampling": samples.describe(),
        "latency": latency,
        "fid": fid,
        "fid_info": fid_info,
        "clip_score": clip,
        "clip_info": clip_info,
        "reference": reference_summary,
        "ssim": consistency["ssim"],
        "psnr": consistency["psnr"],
        "stats_file": str(settings.save_stats) if settings.save_stats else None,
        "output": None,
        "files": None,
        "grid": None,
        "protocol": protocol,
        "bad_samples": bad_samples.to_json() if plan is not None else [],  # FID reference images skipped
    }
    rows, captions = conditional_grid(samples.images, conditions)
    return EvalReport(fields, samples, rows, captions)


def write_eval_output(report: EvalReport, folder: Path, final: Path | None = None) -> EvalReport:
    """Write report.json, grid.png and samples.safetensors into ``folder`` (an AtomicFolder path that
    becomes ``final``; paths in the report name ``final``)."""
    from dpcli.plots import save_image_grid

    folder = Path(folder)
    final = Path(final) if final is not None else folder
    fields = report.fields
    write_samples(report.samples, folder / SAMPLES_FILE, fields["model"])
    grid = save_image_grid(report.grid_rows, folder / GRID_FILE, captions=report.grid_captions)
    fields["files"] = {"report": REPORT_FILE, "grid": GRID_FILE, "samples": SAMPLES_FILE}
    fields["grid"] = {**grid, "path": str(final / GRID_FILE)}
    fields["output"] = str(final)
    (folder / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2, allow_nan=False))
    return report
