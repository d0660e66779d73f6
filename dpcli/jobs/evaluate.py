"""The eval job: ``run`` samples a model (and a reference from the same noise), measures latency, FID, CLIP
score, SSIM and PSNR, and writes the report, grid and samples. Progress goes through a ``Reporter``
(``dpcli.reporting``); the measuring helpers here are shared with the compare job.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.adapters.base import LoadedModel
from dpcli.conditions import ConditioningRequest, Conditions, resolve_conditions
from dpcli.data import DataSpec, Source, open_source
from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import read_json
from dpcli.metrics import (
    DIGITS,
    INCEPTION,
    ClipScorer,
    FidComputer,
    FidStats,
    data_as_uint8,
    extractor_features,
    find_clip_model,
    find_inception_weights,
    load_stats,
    missing_inception_message,
    save_stats,
    ssim_psnr,
)
from dpcli.reporting import Reporter, silent
from dpcli.runtime import is_main_process
from dpcli.sampling import Sampler, SamplerSettings, Samples, generate, steps_for_rank

REPORT_FILE = "report.json"
GRID_FILE = "grid.png"
SAMPLES_FILE = "samples.safetensors"
REPORT_FORMAT = "dpcli-eval"
GRID_SAMPLES = 64  # at most this many images in dp eval's grid
GRID_CONDITIONS = 8  # at most this many prompts or classes (one per column) in dp eval's grid


def _no_progress(description: str, total: int):
    return contextlib.nullcontext(lambda n=1: None)


Progress = Callable[[str, int], contextlib.AbstractContextManager]


# What a model is -------------------------------------------------------------------------------


def block_widths(loaded: LoadedModel) -> list[dict]:
    """Output width of every top-level block (``conv_in``, ``down_blocks.0``, ..., ``mid_block``, ...,
    ``conv_out``): out channels of its last convolution or linear layer, with the width before pruning."""
    original = (loaded.record or {}).get("original_modules", {})
    blocks: dict[str, dict] = {}
    for name, module in loaded.model.named_modules():
        if not isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            continue
        parts = name.split(".")
        block = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        if block.startswith(("time_", "class_")):  # embeddings: not a feature-map width
            continue
        width = module.out_channels if hasattr(module, "out_channels") else module.out_features
        before = original.get(name, {}).get("out_channels")
        blocks[block] = {"name": block, "width": int(width), "original": before}
    return sorted(blocks.values(), key=lambda block: _flow_position(block["name"]))


def _flow_position(name: str) -> int:
    """Blocks in the order data flows through a UNet (the stable sort keeps module order within a stage)."""
    for position, prefix in enumerate(("conv_in", "down_blocks", "mid_block", "up_blocks")):
        if name.startswith(prefix):
            return position
    return 4


def model_summary(loaded: LoadedModel) -> dict:
    """Params, MACs (one batch-1 forward, see dpcli.flops) and block widths of ``loaded``."""
    from dpcli.flops import count_params
    from dpcli.inspection import macs_of

    return {
        "model": loaded.source,
        "adapter": loaded.adapter_name,
        "params": count_params(loaded.model),
        "macs": macs_of(loaded).total,
        "blocks": block_widths(loaded),
    }


# Latency --------------------------------------------------------------------------------------


@dataclass
class LatencySettings:
    batch: int = 64  # the throughput batch; batch 1 is always measured
    warmup: int = 2
    repeats: int = 5

    def validate(self) -> None:
        if self.batch < 1 or self.warmup < 0 or self.repeats < 1:
            raise BadSetting("batch", "{batch} and {repeats} must be at least 1")


def measure_latency(sampler: Sampler, settings: LatencySettings, progress: Progress = _no_progress) -> dict:
    """Median ms per denoising step at batch 1 and at the throughput batch (warm-up excluded)."""
    sizes = [1] + ([settings.batch] if settings.batch > 1 else [])
    runs = settings.warmup + settings.repeats
    results = {}
    with progress("Latency", runs * len(sizes)) as advance:
        for size in sizes:
            results[size] = sampler.step_latency(size, settings.warmup, settings.repeats, on_run=advance)
    return {
        "batch_1_ms": results[1],
        "batch": settings.batch,
        "batch_ms": results.get(settings.batch, results[1]),
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "device": str(sampler.device),
        "precision": sampler.precision_name,
    }


# Sampling with a progress bar -------------------------------------------------------------------


def sample_model(
    loaded: LoadedModel,
    settings: SamplerSettings,
    num_samples: int,
    device=None,
    progress: Progress = _no_progress,
    label: str = "",
) -> tuple[Sampler, Samples | None]:
    """Sample ``num_samples`` images of ``loaded`` (split over torchrun ranks; None on ranks > 0)."""
    sampler = Sampler(loaded, settings, device)
    with progress(f"Sampling {label or loaded.source}", steps_for_rank(sampler, num_samples)) as advance:
        samples = generate(sampler, num_samples, on_step=advance)
    return sampler, samples


# Conditioning ---------------------------------------------------------------------------------


def resolve_sampling_conditions(
    loaded: LoadedModel, request: ConditioningRequest, others: list[LoadedModel] = ()
) -> Conditions:
    """The prompts, labels and guidance ``loaded`` (and every model in ``others``, sampled from the same
    inputs) will sample with; options a model cannot take are refused before any sampling."""
    conditions = resolve_conditions(request, loaded.adapter.conditioning_spec(loaded), loaded.source)
    for other in others:
        theirs = resolve_conditions(request, other.adapter.conditioning_spec(other), other.source)
        if theirs.kind != conditions.kind:
            raise BadInput(
                f"{other.source} is conditioned on {theirs.kind} but {loaded.source} on {conditions.kind}: they "
                "cannot be sampled from the same inputs"
            )
    return conditions


def with_conditions(sampling: SamplerSettings, conditions: Conditions) -> SamplerSettings:
    """``sampling`` with the resolved guidance scale, prompts, negative prompt and class labels."""
    from dataclasses import replace

    return replace(
        sampling,
        guidance_scale=conditions.guidance_scale,
        prompts=conditions.prompts,
        negative_prompt=conditions.negative_prompt,
        class_labels=conditions.class_labels,
    )


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


# CLIP score -----------------------------------------------------------------------------------


def plan_clip(conditions: Conditions, clip_model: str | None, source: str) -> tuple[Path | None, str | None]:
    """The CLIP model folder to score with, or None and why not. Text models only; a --clip-model that
    cannot be found locally is a BadSetting, the default one simply absent."""
    from dpcli.errors import BadSetting

    if conditions.kind != "text":
        if clip_model is not None:
            raise BadSetting(
                "clip_model",
                "{clip_model} scores text-conditional models; {source} is not one",
                source=source,
            )
        return None, "CLIP score is for text-conditional models"
    if not conditions.has_prompts:
        if clip_model is not None:
            raise BadSetting(
                "clip_model", "{clip_model} scores images against their prompts: pass {prompt} or {prompts}"
            )
        return None, "sampled with the empty prompt: pass --prompt or --prompts for a CLIP score"
    folder = find_clip_model(clip_model)
    if folder is None:
        return None, (
            "no CLIP model: pass --clip-model (a local folder, or a Hub id in the Hugging Face cache; "
            "dp never downloads)"
        )
    return folder, None


def compute_clip_score(
    folder: Path, samples: Samples, conditions: Conditions, progress: Progress = _no_progress, device="cpu"
) -> tuple[float, dict]:
    """CLIP score of each sample against the prompt it was sampled with, averaged."""
    scorer = ClipScorer(folder, device=device)
    texts = [conditions.caption(index) for index in samples.indices]
    with progress("CLIP score", len(samples.images)) as advance:
        scorer.update(samples.images, texts, on_batch=advance)
    value = scorer.compute()
    return value, {
        "model": str(folder),
        "image_size": scorer.image_size,
        "samples": len(texts),
        "unavailable": None,
    }


def clip_unavailable(reason: str) -> dict:
    return {"model": None, "image_size": None, "samples": None, "unavailable": reason}


# FID ------------------------------------------------------------------------------------------


@dataclass
class FidPlan:
    """What FID compares against, decided (and validated) before any sampling."""

    extractor: str
    data: DataSpec | str | None = None
    stats: FidStats | None = None
    inception_weights: Path | None = None
    save_stats: Path | None = None
    source: Source | None = None  # ``data``, opened (listed or indexed) when the plan was made

    @property
    def reference(self) -> str:
        return str(self.data) if self.data is not None else f"statistics {self.stats.source}"


def plan_fid(
    data: DataSpec | str | None,
    fid_stats: Path | None,
    inception_weights: Path | None,
    save_stats_to: Path | None,
    num_samples: int,
) -> FidPlan | None:
    """Validate the FID options; None when FID is not requested (no --data and no --fid-stats).

    ``builtin:digits`` uses the shipped digits feature network, anything else Inception-v3, whose
    weights must be available locally (they are never downloaded): a clear BadInput otherwise.
    """
    if data is not None and fid_stats is not None:
        raise BadSetting("fid_stats", "give {data} or {fid_stats} for FID, not both")
    if save_stats_to is not None and data is None:
        raise BadSetting("save_stats", "{save_stats} writes the FID statistics of {data}: pass {data} too")
    if data is None and fid_stats is None:
        if inception_weights is not None:
            raise BadSetting(
                "inception_weights", "{inception_weights} is for FID: pass {data} or {fid_stats} too"
            )
        return None
    if num_samples < 2:
        raise BadSetting("num_samples", "FID needs at least 2 samples ({num_samples} >= 2)", got=num_samples)
    stats = None
    if fid_stats is not None:
        stats = load_stats(fid_stats)
        if stats.extractor not in (INCEPTION, DIGITS):
            raise BadInput(f"{fid_stats}: unknown feature extractor {stats.extractor!r}")
        expected = extractor_features(stats.extractor)
        if stats.features != expected:
            raise BadInput(
                f"{fid_stats} holds statistics of {stats.features} features; {stats.extractor} gives {expected}"
            )
        extractor = stats.extractor
    else:
        source = open_source(data)  # fails before sampling, not after, when --data cannot serve images
        extractor = DIGITS if str(data) == "builtin:digits" else INCEPTION
    weights = find_inception_weights(inception_weights)
    if extractor == INCEPTION and weights is None:
        raise BadInput(missing_inception_message())
    inception = weights if extractor == INCEPTION else None
    return FidPlan(extractor, data, stats, inception, save_stats_to, source if fid_stats is None else None)


def compute_fid(
    plan: FidPlan,
    loaded: LoadedModel,
    samples: Samples,
    progress: Progress = _no_progress,
    device: str | torch.device = "cpu",
) -> tuple[float, dict]:
    """FID of ``samples`` against the plan's data or statistics (features computed on ``device``);
    also writes --save-stats."""
    from dpcli.data import ImageTransform, example_batches

    fid = FidComputer(plan.extractor, plan.inception_weights, device=device)
    if plan.stats is not None:
        fid.set_real_stats(plan.stats)
        reference_count = plan.stats.count
    else:
        adapter = loaded.adapter
        source = plan.source if plan.source is not None else open_source(plan.data)
        if len(source) < 2:
            raise BadInput(f"FID needs at least 2 reference images; {plan.data} has {len(source)}")
        # center-cropped at the model's resolution, never flipped; streamed, so any size of data fits
        transform = ImageTransform(adapter.data_size(loaded), adapter.data_channels(loaded))
        with progress("FID features (data)", len(source)) as advance:
            for batch in example_batches(source, transform):
                fid.update(data_as_uint8(batch.pixels), real=True, on_batch=advance)
        reference_count = len(source)
        if plan.save_stats is not None:
            save_stats(fid.real_stats(str(plan.data)), plan.save_stats, data=str(plan.data))
    with progress("FID features (samples)", len(samples.images)) as advance:
        fid.update(samples.images, real=False, on_batch=advance)
    value = fid.compute()
    info = {
        "extractor": plan.extractor,
        "features": fid.features,
        "reference": plan.reference,
        "reference_count": reference_count,
        "samples": len(samples.images),
        "unavailable": None,
    }
    return value, info


def fid_unavailable(reason: str) -> dict:
    return {
        "extractor": None,
        "features": None,
        "reference": None,
        "reference_count": None,
        "samples": None,
        "unavailable": reason,
    }


# dp eval --------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
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
    split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    on_bad_sample: str | None = None  # skip (the default) or fail: dpcli.data.bad_samples
    max_bad_fraction: float | None = None  # the cap on skipped examples (default 0.01)
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


def check_same_noise(model: LoadedModel, reference: LoadedModel, what: str = "reference") -> None:
    """Two models compared from the same noise must sample the same shape."""
    mine = tuple(model.adapter.noise_shape(model))
    theirs = tuple(reference.adapter.noise_shape(reference))
    if mine != theirs:
        raise BadInput(
            f"{what} {reference.source} samples {_shape_text(theirs)} but {model.source} samples "
            f"{_shape_text(mine)}: different sample size or channel count, no common noise to compare from"
        )


def _shape_text(shape) -> str:
    channels, *size = shape
    return f"{channels} channel(s) at {'x'.join(map(str, size))}"


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


def write_samples(samples: Samples, path: Path, model: str) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "dpcli-samples", "model": model, "sampling": json.dumps(samples.describe())}
    tensors = {
        "images": samples.images.contiguous(),
        "indices": torch.tensor(samples.indices, dtype=torch.long),
    }
    save_file(tensors, str(path), metadata=metadata)


def read_eval_report(path: Path) -> tuple[dict, torch.Tensor | None, Path]:
    """A dp eval report (report.json, or the folder holding it) and its samples when present."""
    path = Path(path).expanduser()
    file = path / REPORT_FILE if path.is_dir() else path
    if not file.is_file():
        raise BadSetting(
            "reports",
            "{reports} {path}: no dp eval report there (expected {file})",
            path=path,
            file=REPORT_FILE,
        )
    report = read_json(file)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise BadInput(f"{file} is not a dp eval report")
    images = None
    samples_file = file.parent / ((report.get("files") or {}).get("samples") or SAMPLES_FILE)
    if samples_file.is_file():
        from dpcli.io.weights import load_tensor_file

        images = load_tensor_file(samples_file).get("images")
    return report, images, file
