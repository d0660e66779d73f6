"""The score job: importance scores of every prunable group, with the timestep scan, saved and reloaded."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.adapters.base import LoadedModel
from dpcli.data.base import DataSpec, settings_data_spec
from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import atomic_write
from dpcli.io.model_format import model_signature
from dpcli.io.weights import load_tensor_file
from dpcli.pruning import PruneOptions, collect_scores
from dpcli.reporting import Reporter, silent
from dpcli.runtime import Distributed, check_precision, check_weights_precision
from dpcli.scoring import (
    ScanResult,
    accumulate_gradients,
    calibration_batch,
    calibration_noise,
    gradient_checkpointing,
    place,
    share_rows,
)

SCORES_FORMAT = "dpcli-scores"


@dataclass
class ScoreSettings:
    """Everything that decides the scores (recorded with them), named as ``dp score``'s options."""

    criterion: str | None = "diff-taylor"
    data: DataSpec | str | Path | None = None
    split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    on_bad_sample: str | None = None  # skip (the default) or fail: dpcli.data.bad_samples
    max_bad_fraction: float | None = None  # the cap on skipped examples (default 0.01)
    workers: int | None = None  # DataLoader workers decoding the calibration images (None: the default)
    threshold: float | None = None
    batch_size: int = 256
    calib_size: int | None = None  # DEFAULT_CALIB_SIZE, unless scan_budget chooses
    chunk: int | None = None
    timesteps: int | None = None
    timestep_stride: int | None = None  # 1 (every timestep, the reference), unless scan_budget chooses
    scan_budget: int | None = None
    prompt: str | None = None
    device: str = "auto"  # where the scan runs (dpcli.runtime.start_distributed)
    precision: str = "fp32"  # or bf16 / fp16: autocast for the scan's forward
    gradient_checkpointing: bool = False  # recompute activations in the scan's backward (less memory)
    seed: int = 0
    ignore: list[str] | None = None
    round_to: int | None = None
    head_ratio: float | None = 0.0

    def __post_init__(self):
        self.data = settings_data_spec(self)

    @property
    def options(self) -> PruneOptions:
        """The pruning options the scores are computed for."""
        return PruneOptions(
            ignore=list(self.ignore or []), round_to=self.round_to, head_ratio=self.head_ratio or 0.0
        )

    def validate(self) -> None:
        """Fail before the model is loaded: an unknown criterion, a scan threshold outside [0, 1], a stride
        or budget below 1."""
        from dpcli.plugins import get_registry

        criterion = get_registry().criterion(self.criterion)
        # the threshold given, even to a criterion that ignores it, and the one the criterion scans with
        check_threshold(self.threshold)
        check_threshold(criterion.scan_threshold(self.threshold))
        if self.timestep_stride is not None and self.timestep_stride < 1:
            raise BadSetting(
                "timestep_stride", "{timestep_stride} must be at least 1", got=self.timestep_stride
            )
        check_precision(self.precision)
        if self.calib_size is not None and self.calib_size < 1:
            raise BadSetting("calib_size", "{calib_size} must be at least 1", got=self.calib_size)
        if self.scan_budget is not None:
            if self.scan_budget < 1:
                raise BadSetting("scan_budget", "{scan_budget} must be at least 1", got=self.scan_budget)
            if self.timestep_stride is not None or self.calib_size is not None:
                raise BadSetting(
                    "scan_budget",
                    "{scan_budget} chooses {timestep_stride} and {calib_size}: give the budget or those",
                )


DEFAULT_CALIB_SIZE = 32


def check_threshold(threshold: float | None) -> None:
    """A scan threshold is a fraction of the running loss maximum: None (the default) or in [0, 1]."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise BadSetting("threshold", "{threshold} must be in [0, 1]", got=threshold)


@dataclass
class Scores:
    """Channel scores of every prunable group, and the scan that produced them (if any)."""

    criterion: str
    tensors: dict[str, torch.Tensor]
    scan: ScanResult | None
    settings: dict
    model_signature: str
    seconds: float

    def recorded_options(self) -> PruneOptions:
        """The pruning options (``ignore``, ``round_to``, ``head_ratio``) the scores were computed with."""
        return PruneOptions(
            ignore=self.settings.get("ignore") or [],
            round_to=self.settings.get("round_to"),
            head_ratio=self.settings.get("head_ratio") or 0.0,
        )


# Packing timesteps stops paying at about this many samples per forward, per device type.
# cpu: measured; on 2 idle cores the digits scan was fastest at 64 and slower at 128 and 256
#   (benchmarks/pruning.md, "default --chunk").
# cuda: NOT measured (no GPU was available where this was written; benchmarks/gpu.py --quick measures
#   packed against unpacked on one). 256 is reasoning, not a measurement: a GPU needs hundreds of samples
#   in flight to be busy (the reference scans 128 images per timestep on one GPU, so 256 is two of its
#   timesteps per pass), and --batch-size (default 256) still caps a pass, which bounds its memory.
# Anything else (mps) takes the CPU's figure.
SAMPLES_PER_PASS = {"cpu": 64, "cuda": 256}


def default_chunk(calib_size: int, batch_size: int, device_type: str = "cpu") -> int:
    """Timesteps per forward: about ``SAMPLES_PER_PASS[device_type]`` samples (``calib_size`` being the
    images one device holds), never more than ``batch_size``."""
    samples = SAMPLES_PER_PASS.get(device_type, SAMPLES_PER_PASS["cpu"])
    return max(1, min(batch_size, samples) // max(1, calib_size))


def share_chunk(chunk: int | None, batch_size: int, images: int, dist: Distributed) -> int:
    """``chunk``, or the default for the largest share of ``images`` calibration images one device holds."""
    share = -(-images // dist.world_size)
    return chunk or default_chunk(share, batch_size, dist.device.type)


# --scan-budget: how dp spends N forward samples (benchmarks/scan_budget.py, docs/benchmarks.md "Scan
# budget"). Agreement with a large-calibration scan depends far more on the calibration images than on
# scanning every timestep, until the stride reaches 32: so the budget goes to calibration images first, at
# the coarsest stride that kept agreement (16), and to finer strides only once the images reach
# BUDGET_MAX_CALIB (or the data runs out).
BUDGET_STRIDES = (16, 8, 4, 2, 1)
BUDGET_MIN_CALIB = 8
BUDGET_MAX_CALIB = 256
# The cost of a scan is (cutoff / stride + 1) × calibration images, and the cutoff is not known before: a
# forward-only pilot scan of PILOT_IMAGES images at stride BUDGET_STRIDES[0] estimates it.
PILOT_IMAGES = 16


@dataclass
class ScanPlan:
    """What ``--scan-budget`` chose: stride and calibration size, from the pilot's cutoff estimate."""

    scan_budget: int
    timestep_stride: int
    calib_size: int
    estimated_cutoff: int
    estimated_samples: int
    pilot_samples: int = 0

    def to_json(self) -> dict:
        return dict(vars(self))


def plan_scan(budget: int, estimated_cutoff: int, available: int | None = None) -> ScanPlan:
    """Stride and calibration size for a scan of about ``budget`` forward samples (the rule above).

    ``estimated_cutoff`` is the expected last scanned timestep; ``available`` caps the calibration size
    (the images in the data). A budget below ``BUDGET_MIN_CALIB`` images at the coarsest stride is an error.
    """
    most = min(BUDGET_MAX_CALIB, available) if available else BUDGET_MAX_CALIB

    def scanned(stride: int) -> int:
        return estimated_cutoff // stride + 1

    coarsest = BUDGET_STRIDES[0]
    least = min(BUDGET_MIN_CALIB, most) * scanned(coarsest)
    if budget < least:
        raise BadSetting(
            "scan_budget",
            "{scan_budget} is too small for this model and threshold: at least {least} forward samples "
            "({images} images × {steps} timesteps at stride {stride}, cutoff about t = {cutoff})",
            got=budget,
            least=least,
            images=min(BUDGET_MIN_CALIB, most),
            steps=scanned(coarsest),
            stride=coarsest,
            cutoff=estimated_cutoff,
        )
    calib = budget // scanned(coarsest)
    stride = coarsest
    if calib > most:
        calib = most
        stride = next(k for k in reversed(BUDGET_STRIDES) if calib * scanned(k) <= budget)
    return ScanPlan(budget, stride, calib, estimated_cutoff, calib * scanned(stride))


def _calibration(
    loaded: LoadedModel, adapter, settings: ScoreSettings, size: int, dist: Distributed, fit: bool = False
):
    """This process's share of the calibration batch of ``size`` images (all of it in a single process)
    and of its noise; with ``fit``, as many images as the data has if it has fewer.

    Returns ``(x0, noise, conditioning, available)``: ``available`` is the data's image count when it was
    smaller than ``size`` (else None)."""
    from dpcli.data import open_source

    source = open_source(settings.data)
    available = len(source) if fit and len(source) < size else None
    total = available or size
    rows = share_rows(total, dist.rank, dist.world_size) if dist.enabled else None
    x0, conditioning = calibration_batch(
        loaded,
        adapter,
        source,
        total,
        settings.seed,
        prompt=settings.prompt,
        workers=settings.workers,
        rows=rows,
    )
    return x0, calibration_noise(x0, settings.seed, rows, total), conditioning, available


def plan_budget_scan(
    loaded: LoadedModel, adapter, settings: ScoreSettings, threshold: float, dist: Distributed | None = None
) -> ScanPlan:
    """Run the forward-only pilot scan and choose stride and calibration size for ``settings.scan_budget``.

    Under torchrun the pilot's images are shared out too and its losses summed: every process plans the
    same scan."""
    dist = dist or Distributed(device=next(loaded.model.parameters()).device)
    x0, noise, conditioning, available = _calibration(loaded, adapter, settings, PILOT_IMAGES, dist, fit=True)
    pilot = accumulate_gradients(
        loaded,
        adapter,
        x0,
        noise,
        threshold,
        timesteps=settings.timesteps,
        chunk=share_chunk(None, settings.batch_size, available or PILOT_IMAGES, dist),
        batch_size=settings.batch_size,
        conditioning=conditioning,
        stride=BUDGET_STRIDES[0],
        gradients=False,
        precision=settings.precision,
        dist=dist,
    )
    # A pilot that ran to the last timestep says the scan will too; one that stopped at t stops the real
    # scan (finer stride, more images) at about t, a little earlier at most.
    estimated_cutoff = pilot.cutoff if pilot.stopped_early else pilot.timesteps - 1
    plan = plan_scan(settings.scan_budget, estimated_cutoff, available)
    plan.pilot_samples = pilot.samples_computed
    return plan


def compute_scores(
    loaded: LoadedModel, settings: ScoreSettings, on_progress=None, dist: Distributed | None = None
) -> Scores:
    """Score ``loaded`` with a criterion: the timestep scan first when the criterion needs gradients.

    ``dist`` (``dpcli.runtime.start_distributed``) says on which device the model, the calibration batch
    and the scan live, and under torchrun which share of the calibration images this process takes;
    without it, everything stays on the device the model is on, in one process. The calibration images
    skipped as unreadable are recorded as ``bad_samples`` in the scores' settings."""
    from dpcli.data import recording

    with recording() as bad_samples:
        scores = _compute_scores(loaded, settings, on_progress, dist)
    scores.settings["bad_samples"] = bad_samples.to_json()
    return scores


def _compute_scores(loaded: LoadedModel, settings: ScoreSettings, on_progress, dist) -> Scores:
    from dpcli.plugins import get_registry

    settings.validate()
    criterion = get_registry().criterion(settings.criterion)
    adapter = loaded.adapter
    dist = dist or Distributed(device=next(loaded.model.parameters()).device)
    check_precision(settings.precision, dist.device)
    if criterion.needs_gradients:
        check_weights_precision(loaded.model, settings.precision)
    place(loaded, dist.device)
    threshold = criterion.scan_threshold(settings.threshold)
    started = time.perf_counter()
    scan = plan = None
    calib_size = settings.calib_size or DEFAULT_CALIB_SIZE
    stride = settings.timestep_stride or 1
    if criterion.needs_gradients:
        if not settings.data:
            raise BadSetting(
                "data",
                "criterion '{name}' needs calibration data: pass {data} FOLDER or builtin:digits",
                name=criterion.name,
            )
        if settings.scan_budget is not None:
            plan = plan_budget_scan(loaded, adapter, settings, threshold, dist)
            calib_size, stride = plan.calib_size, plan.timestep_stride
        x0, noise, conditioning, available = _calibration(
            loaded, adapter, settings, calib_size, dist, fit=plan is not None
        )
        with gradient_checkpointing(loaded.model, settings.gradient_checkpointing):
            scan = accumulate_gradients(
                loaded,
                adapter,
                x0,
                noise,
                threshold,
                timesteps=settings.timesteps,
                chunk=share_chunk(settings.chunk, settings.batch_size, available or calib_size, dist),
                batch_size=settings.batch_size,
                conditioning=conditioning,
                on_progress=on_progress,
                squared=bool(getattr(criterion, "squared_gradients", False)),
                stride=stride,
                precision=settings.precision,
                dist=dist,
            )
        del x0, noise, conditioning
    tensors = collect_scores(loaded, adapter, criterion, threshold, settings.seed, settings.options)
    loaded.model.zero_grad(set_to_none=True)
    recorded = {
        "criterion": criterion.name,
        "threshold": threshold if criterion.uses_threshold else None,
        "data": str(settings.data) if criterion.needs_data and settings.data else None,
        "calib_size": (scan.calib_size if scan else calib_size) if criterion.needs_data else None,
        "seed": settings.seed,
        "timesteps": scan.timesteps if scan else None,
        "chunk": scan.chunk if scan else None,
        "timestep_stride": scan.stride if scan else None,
        "scan_budget": plan.to_json() if plan else None,
        "precision": settings.precision if scan else None,
        "ignore": settings.options.ignore,
        "round_to": settings.options.round_to,
        "head_ratio": settings.options.head_ratio,
        "prompt": settings.prompt if criterion.needs_data else None,
    }
    return Scores(
        criterion.name, tensors, scan, recorded, model_signature(loaded.model), time.perf_counter() - started
    )


@dataclass
class ScoreReport:
    """What a scoring run reports: the scan and per-group score statistics (``dp score`` prints ``to_json()``
    with ``--json`` and renders the same data as tables)."""

    scores: Scores
    output: Path | None = None
    plot: Path | None = None

    def to_json(self) -> dict:
        scan = self.scores.scan
        layers = []
        for key, tensor in sorted(self.scores.tensors.items()):
            values = tensor.float()
            layers.append(
                {
                    "group": key,
                    "channels": values.numel(),
                    "min": float(values.min()),
                    "mean": float(values.mean()),
                    "max": float(values.max()),
                    "std": float(values.std()) if values.numel() > 1 else 0.0,
                }
            )
        return {
            "criterion": self.scores.criterion,
            "cutoff": scan.cutoff if scan else None,
            "losses": [loss if math.isfinite(loss) else None for loss in scan.losses] if scan else [],
            "threshold": self.scores.settings.get("threshold"),
            "timesteps_scanned": len(scan.losses) if scan else 0,
            "timesteps_total": scan.timesteps if scan else None,
            "forward_passes": scan.forward_passes if scan else 0,
            "samples": scan.samples_computed if scan else 0,
            "timestep_stride": scan.stride if scan else None,
            "scan_budget": self.scores.settings.get("scan_budget"),
            "chunk": scan.chunk if scan else None,
            "calib_size": scan.calib_size if scan else None,
            "device": scan.device if scan else None,
            "world_size": scan.world_size if scan else None,
            "precision": self.scores.settings.get("precision"),
            "seconds": self.scores.seconds,
            "scan_seconds": scan.seconds if scan else 0.0,
            "groups": len(self.scores.tensors),
            "output": str(self.output) if self.output else None,
            "plot": str(self.plot) if self.plot and scan else None,
            "bad_samples": self.scores.settings.get("bad_samples", []),
            "layers": layers,
        }


def run(
    loaded: LoadedModel,
    settings: ScoreSettings,
    *,
    output: Path | None = None,
    plot: Path | None = None,
    reporter: Reporter | None = None,
) -> ScoreReport:
    """The score job: compute the scores on ``settings.device`` (under torchrun, each process takes its
    share of the calibration images), then write them to ``output`` and the loss curve to ``plot`` (PNG):
    only the main process locks and writes."""
    from dpcli.io.files import output_lock
    from dpcli.plots import plot_losses
    from dpcli.runtime import start_distributed

    reporter = silent(reporter)
    settings.validate()
    output = Path(output) if output is not None else None
    if output is not None and output.is_dir():
        raise BadSetting(
            "output", "{output} {path} is a folder; give a file name such as scores.safetensors", path=output
        )
    dist = start_distributed(settings.device)
    try:
        check_precision(settings.precision, dist.device)
        lock = output_lock(output, on_note=reporter.warn) if output is not None else contextlib.nullcontext()
        with lock:
            scores = scan_and_score(loaded, settings, dist, reporter if dist.is_main else Reporter())
            if dist.is_main:
                if output is not None:
                    save_scores(scores, output, loaded.source)
                if plot is not None and scores.scan is not None:
                    plot_losses(scores.scan, Path(plot), title=f"{loaded.source}: {settings.criterion}")
    finally:
        dist.close()
    return ScoreReport(scores, output, Path(plot) if plot is not None else None)


def scan_and_score(
    loaded: LoadedModel, settings: ScoreSettings, dist: Distributed, reporter: Reporter
) -> Scores:
    """``compute_scores`` with the timestep scan shown as a ``reporter`` stage (criteria with a scan)."""
    from dpcli.plugins import get_registry

    if not get_registry().criterion(settings.criterion).needs_gradients:
        return compute_scores(loaded, settings, dist=dist)
    total = int(settings.timesteps or loaded.scheduler.config.num_train_timesteps)
    with reporter.progress("Timestep scan", total) as advance:
        return compute_scores(
            loaded,
            settings,
            on_progress=lambda step, loss: advance(completed=step + 1, note=f"t={step} loss={loss:.4f}"),
            dist=dist,
        )


def save_scores(scores: Scores, path: Path, model_source: str) -> None:
    """Scores as safetensors (one tensor per group key) with the settings and scan in the metadata."""
    from safetensors.torch import save_file

    scan = scores.scan
    metadata = {
        "format": SCORES_FORMAT,
        "dpcli_version": __version__,
        "model": model_source,
        "model_signature": scores.model_signature,
        "settings": json.dumps(scores.settings),
        "cutoff": json.dumps(scan.cutoff if scan else None),
        "losses": json.dumps(scan.losses if scan else []),
    }
    with atomic_write(path) as temporary:
        save_file({k: v.contiguous() for k, v in scores.tensors.items()}, str(temporary), metadata=metadata)


def load_scores(path: Path, loaded: LoadedModel) -> Scores:
    """Scores written by ``dp score``, checked against the model they are applied to."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"scores file not found: {path}")
    tensors = load_tensor_file(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != SCORES_FORMAT:
        raise BadInput(f"{path} is not a dp score file")
    if metadata.get("model_signature") != model_signature(loaded.model):
        raise BadInput(f"{path} was computed for a model of another shape ({metadata.get('model')})")
    settings = json.loads(metadata["settings"])
    cutoff = json.loads(metadata.get("cutoff", "null"))
    losses = json.loads(metadata.get("losses", "[]"))
    scan = None
    if cutoff is not None:
        scan = ScanResult(
            cutoff=cutoff,
            losses=losses,
            threshold=settings.get("threshold") or 0.0,
            timesteps=settings.get("timesteps") or 0,
            chunk=settings.get("chunk") or 1,
            calib_size=settings.get("calib_size") or 0,
            seconds=0.0,
            stride=settings.get("timestep_stride") or 1,
        )
    return Scores(settings["criterion"], tensors, scan, settings, metadata["model_signature"], 0.0)
