"""The score job: importance scores of every prunable group, with the timestep scan, saved and reloaded."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.adapters.base import LoadedModel
from dpcli.data.base import DataSpec
from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import atomic_write
from dpcli.io.model_format import model_signature
from dpcli.io.weights import load_tensor_file
from dpcli.pruning import PruneOptions, collect_scores
from dpcli.scoring import ScanResult, accumulate_gradients, calibration_batch, calibration_noise

SCORES_FORMAT = "dpcli-scores"


@dataclass
class ScoreSettings:
    """Everything that decides the scores (recorded with them)."""

    criterion: str
    data: DataSpec | str | None = None
    threshold: float | None = None
    calib_size: int = 32
    batch_size: int = 256
    chunk: int | None = None
    timesteps: int | None = None
    seed: int = 0
    options: PruneOptions = field(default_factory=PruneOptions)
    prompt: str | None = None
    workers: int | None = None  # DataLoader workers decoding the calibration images (None: the default)

    def validate(self) -> None:
        """Fail before the model is loaded: an unknown criterion, a scan threshold outside [0, 1]."""
        from dpcli.plugins import get_registry

        criterion = get_registry().criterion(self.criterion)
        # the threshold given, even to a criterion that ignores it, and the one the criterion scans with
        check_threshold(self.threshold)
        check_threshold(criterion.scan_threshold(self.threshold))


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


# Packing timesteps stops paying at about this many samples per forward on a CPU: on 2 idle cores the
# digits scan was fastest at 64 and slower at 128 and 256 (benchmarks/pruning.md, "default --chunk").
SAMPLES_PER_PASS = 64


def default_chunk(calib_size: int, batch_size: int) -> int:
    """Timesteps per forward: about ``SAMPLES_PER_PASS`` samples, never more than ``batch_size``."""
    return max(1, min(batch_size, SAMPLES_PER_PASS) // max(1, calib_size))


def compute_scores(loaded: LoadedModel, settings: ScoreSettings, on_progress=None) -> Scores:
    """Score ``loaded`` with a criterion: the timestep scan first when the criterion needs gradients."""
    from dpcli.plugins import get_registry

    settings.validate()
    criterion = get_registry().criterion(settings.criterion)
    adapter = loaded.adapter_object
    threshold = criterion.scan_threshold(settings.threshold)
    started = time.perf_counter()
    scan = None
    if criterion.needs_gradients:
        if not settings.data:
            raise BadSetting(
                "data",
                "criterion '{name}' needs calibration data: pass {data} FOLDER or builtin:digits",
                name=criterion.name,
            )
        x0, conditioning = calibration_batch(
            loaded,
            adapter,
            settings.data,
            settings.calib_size,
            settings.seed,
            prompt=settings.prompt,
            workers=settings.workers,
        )
        noise = calibration_noise(x0, settings.seed)
        chunk = settings.chunk or default_chunk(x0.shape[0], settings.batch_size)
        scan = accumulate_gradients(
            loaded,
            adapter,
            x0,
            noise,
            threshold,
            timesteps=settings.timesteps,
            chunk=chunk,
            batch_size=settings.batch_size,
            conditioning=conditioning,
            on_progress=on_progress,
            squared=bool(getattr(criterion, "squared_gradients", False)),
        )
    tensors = collect_scores(loaded, adapter, criterion, threshold, settings.seed, settings.options)
    loaded.model.zero_grad(set_to_none=True)
    recorded = {
        "criterion": criterion.name,
        "threshold": threshold if criterion.uses_threshold else None,
        "data": str(settings.data) if criterion.needs_data and settings.data else None,
        "calib_size": settings.calib_size if criterion.needs_data else None,
        "seed": settings.seed,
        "timesteps": scan.timesteps if scan else None,
        "chunk": scan.chunk if scan else None,
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
            "chunk": scan.chunk if scan else None,
            "calib_size": scan.calib_size if scan else None,
            "seconds": self.scores.seconds,
            "scan_seconds": scan.seconds if scan else 0.0,
            "groups": len(self.scores.tensors),
            "output": str(self.output) if self.output else None,
            "plot": str(self.plot) if self.plot and scan else None,
            "layers": layers,
        }


def score_model(
    loaded: LoadedModel,
    settings: ScoreSettings,
    output: Path | None = None,
    plot: Path | None = None,
    on_progress=None,
) -> ScoreReport:
    """The score job: compute the scores, then write them to ``output`` and the loss curve to ``plot`` (PNG)."""
    from dpcli.plots import plot_losses

    scores = compute_scores(loaded, settings, on_progress=on_progress)
    if output is not None:
        save_scores(scores, output, loaded.source)
    if plot is not None and scores.scan is not None:
        plot_losses(scores.scan, plot, title=f"{loaded.source}: {settings.criterion}")
    return ScoreReport(scores, output, plot)


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
        )
    return Scores(settings["criterion"], tensors, scan, settings, metadata["model_signature"], 0.0)
