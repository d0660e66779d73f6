"""The measuring toolkit of the eval and compare jobs: what a model is (params, MACs, block widths), its
sampling speed, sampling with a progress bar from resolved conditions, and FID and CLIP score."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.conditions import ConditioningRequest, Conditions, resolve_conditions
from dpcli.data import DataSpec, Source, open_source
from dpcli.errors import BadInput, BadSetting
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
)
from dpcli.sampling import Sampler, SamplerSettings, Samples, generate, steps_for_rank


def no_progress(description: str, total: int):
    return contextlib.nullcontext(lambda n=1: None)


Progress = Callable[[str, int], contextlib.AbstractContextManager]


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


@dataclass
class LatencySettings:
    batch: int = 64  # the throughput batch; batch 1 is always measured
    warmup: int = 2
    repeats: int = 5

    def validate(self) -> None:
        if self.batch < 1 or self.warmup < 0 or self.repeats < 1:
            raise BadSetting("batch", "{batch} and {repeats} must be at least 1")


def measure_latency(sampler: Sampler, settings: LatencySettings, progress: Progress = no_progress) -> dict:
    """Median ms per denoising step at batch 1 and at the throughput batch (warm-up excluded)."""
    return measure_latencies([sampler], settings, progress)[0]


def measure_latencies(
    samplers: list[Sampler], settings: LatencySettings, progress: Progress = no_progress
) -> list[dict]:
    """``measure_latency`` of several samplers at once, timed round-robin (one step of each in turn, the
    order rotated every round), so that a change in the machine's speed while they run (load, clocks,
    another process) falls on all of them alike and their speedups stay fair."""
    sizes = [1] + ([settings.batch] if settings.batch > 1 else [])
    runs = settings.warmup + settings.repeats
    medians: list[dict[int, float]] = [{} for _ in samplers]
    with progress("Latency", runs * len(sizes) * len(samplers)) as advance:
        for size in sizes:
            timers = [sampler.step_timer(size) for sampler in samplers]
            times: list[list[float]] = [[] for _ in samplers]
            for run in range(runs):
                for offset in range(len(timers)):
                    index = (run + offset) % len(timers)
                    elapsed = timers[index]()
                    if run >= settings.warmup:
                        times[index].append(elapsed)
                    advance()
            for index, measured in enumerate(times):
                medians[index][size] = statistics.median(measured) * 1000
    return [
        {
            "batch_1_ms": median[1],
            "batch": settings.batch,
            "batch_ms": median.get(settings.batch, median[1]),
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "device": str(sampler.device),
            "precision": sampler.precision_name,
        }
        for sampler, median in zip(samplers, medians, strict=True)
    ]


def sample_model(
    loaded: LoadedModel,
    settings: SamplerSettings,
    num_samples: int,
    device=None,
    progress: Progress = no_progress,
    label: str = "",
) -> tuple[Sampler, Samples | None]:
    """Sample ``num_samples`` images of ``loaded`` (split over torchrun ranks; None on ranks > 0)."""
    sampler = Sampler(loaded, settings, device)
    with progress(f"Sampling {label or loaded.source}", steps_for_rank(sampler, num_samples)) as advance:
        samples = generate(sampler, num_samples, on_step=advance)
    return sampler, samples


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
    folder: Path, samples: Samples, conditions: Conditions, progress: Progress = no_progress, device="cpu"
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
    progress: Progress = no_progress,
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
