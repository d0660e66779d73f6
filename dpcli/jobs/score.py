"""The score job: importance scores of every prunable group, with the timestep scan, saved and reloaded."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.data.base import DataOptions, DataSpec, settings_data_spec
from dpcli.errors import BadInput, BadSetting
from dpcli.io.model_format import model_signature
from dpcli.io.scores_file import ScoresFile, read_scores_file, write_scores_file
from dpcli.jobs.scan_budget import plan_budget_scan
from dpcli.pruning import PruneOptions, collect_scores
from dpcli.reporting import Reporter, silent
from dpcli.runtime import Distributed, check_precision, check_weights_precision
from dpcli.scoring import (
    ScanResult,
    check_grad_sum_dtype,
    gradient_checkpointing,
    place,
    scan_calibration,
)


@dataclass
class ScoreSettings(DataOptions):
    """Everything that decides the scores (recorded with them), named as ``dp score``'s options."""

    criterion: str | None = "diff-taylor"
    data: DataSpec | str | Path | None = None
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
    grad_sum_dtype: str = "fp32"  # or weights: sum bf16/fp16 weights' gradients in their own dtype
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
        check_grad_sum_dtype(self.grad_sum_dtype)
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
        with gradient_checkpointing(loaded.model, settings.gradient_checkpointing):
            scan, _ = scan_calibration(
                loaded,
                adapter,
                settings,
                calib_size,
                threshold,
                dist,
                chunk=settings.chunk,
                fit=plan is not None,
                on_progress=on_progress,
                squared=bool(getattr(criterion, "squared_gradients", False)),
                stride=stride,
            )
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
        "grad_sum_dtype": settings.grad_sum_dtype if scan else None,
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
            "grad_sum_dtype": self.scores.settings.get("grad_sum_dtype"),
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
    """Write ``scores`` (computed for the model ``model_source``) as a scores file (``dpcli.io.scores_file``)."""
    scan = scores.scan
    cutoff, losses = (scan.cutoff, scan.losses) if scan else (None, [])
    file = ScoresFile(scores.tensors, scores.settings, model_source, scores.model_signature, cutoff, losses)
    write_scores_file(path, file)


def load_scores(path: Path, loaded: LoadedModel) -> Scores:
    """Scores written by ``dp score``, checked against the model they are applied to."""
    file = read_scores_file(path)
    if file.model_signature != model_signature(loaded.model):
        raise BadInput(f"{path} was computed for a model of another shape ({file.model})")
    settings = file.settings
    scan = None
    if file.cutoff is not None:
        scan = ScanResult(
            cutoff=file.cutoff,
            losses=file.losses,
            threshold=settings.get("threshold") or 0.0,
            timesteps=settings.get("timesteps") or 0,
            chunk=settings.get("chunk") or 1,
            calib_size=settings.get("calib_size") or 0,
            seconds=0.0,
            stride=settings.get("timestep_stride") or 1,
        )
    return Scores(settings["criterion"], file.tensors, scan, settings, file.model_signature, 0.0)
