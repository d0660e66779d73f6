"""The score and prune jobs as Python functions; the CLI commands are thin shells over these."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput
from dpcli.flops import count_params
from dpcli.io.files import atomic_write
from dpcli.io.model_format import model_signature, module_shapes
from dpcli.io.weights import load_tensor_file
from dpcli.pruning import PruneOptions, collect_scores, output_shape, prune_to_target
from dpcli.scoring import ScanResult, accumulate_gradients, calibration_batch, calibration_noise

SCORES_FORMAT = "dpcli-scores"


@dataclass
class ScoreSettings:
    """Everything that decides the scores (recorded with them)."""

    criterion: str
    data: str | None = None
    threshold: float | None = None
    calib_size: int = 32
    batch_size: int = 256
    chunk: int | None = None
    timesteps: int | None = None
    seed: int = 0
    options: PruneOptions = field(default_factory=PruneOptions)
    prompt: str | None = None


@dataclass
class Scores:
    """Channel scores of every prunable group, and the scan that produced them (if any)."""

    criterion: str
    tensors: dict[str, torch.Tensor]
    scan: ScanResult | None
    settings: dict
    model_signature: str
    seconds: float


def adapter_of(loaded: LoadedModel):
    """Deprecated: use ``loaded.adapter_object``."""
    warnings.warn(
        "dpcli.workflow.adapter_of is deprecated; use loaded.adapter_object", DeprecationWarning, stacklevel=2
    )
    return loaded.adapter_object


# Packing timesteps stops paying at about this many samples per forward on a CPU: on 2 idle cores the
# digits scan was fastest at 64 and slower at 128 and 256 (benchmarks/pruning.md, "default --chunk").
SAMPLES_PER_PASS = 64


def default_chunk(calib_size: int, batch_size: int) -> int:
    """Timesteps per forward: about ``SAMPLES_PER_PASS`` samples, never more than ``batch_size``."""
    return max(1, min(batch_size, SAMPLES_PER_PASS) // max(1, calib_size))


def compute_scores(loaded: LoadedModel, settings: ScoreSettings, on_progress=None) -> Scores:
    """Score ``loaded`` with a criterion: the timestep scan first when the criterion needs gradients."""
    from dpcli.plugins import get_registry

    criterion = get_registry().criterion(settings.criterion)
    adapter = loaded.adapter_object
    threshold = criterion.scan_threshold(settings.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise BadInput(f"--threshold must be in [0, 1], got {threshold}")
    started = time.perf_counter()
    scan = None
    if criterion.needs_gradients:
        if not settings.data:
            raise BadInput(
                f"criterion '{criterion.name}' needs calibration data: pass --data FOLDER or builtin:digits"
            )
        x0, conditioning = calibration_batch(
            loaded, adapter, settings.data, settings.calib_size, settings.seed, prompt=settings.prompt
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
        "data": settings.data if criterion.needs_data else None,
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


def measure(loaded: LoadedModel) -> tuple[int, int]:
    """(params, MACs) of ``loaded`` at batch 1, native size."""
    from dpcli.inspection import macs_of

    return count_params(loaded.model), macs_of(loaded).total


def layer_rows(loaded: LoadedModel) -> dict[str, dict]:
    """Per-layer widths, params and MACs by layer name, for before/after tables."""
    from dpcli.inspection import layer_rows as rows_of

    return {row.pop("name"): row for row in rows_of(loaded)}


@dataclass
class PruneSettings:
    ratio: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    tolerance: float = 0.05


def validate_prune_settings(settings: PruneSettings) -> None:
    given = [v for v in (settings.ratio, settings.target_macs, settings.target_params) if v is not None]
    if len(given) != 1:
        raise BadInput("give exactly one of --ratio, --target-macs, --target-params")
    if settings.ratio is not None and not 0.0 <= settings.ratio < 1.0:
        raise BadInput(f"--ratio must be in [0, 1), got {settings.ratio}")
    for name, value in (("--target-macs", settings.target_macs), ("--target-params", settings.target_params)):
        if value is not None and not 0.0 < value < 1.0:
            raise BadInput(f"{name} is a fraction of the original and must be in (0, 1), got {value}")


def prune_model(
    loaded: LoadedModel,
    scores: Scores,
    settings: PruneSettings,
    options: PruneOptions,
    seed: int = 0,
    on_trial=None,
) -> dict:
    """Prune ``loaded`` in place with ``scores``; return the report (sizes, ratio, per-layer rows)."""
    from dpcli.plugins import get_registry

    validate_prune_settings(settings)
    criterion = get_registry().criterion(scores.criterion)
    adapter = loaded.adapter_object
    shape_before = output_shape(loaded, adapter)
    before_rows = layer_rows(loaded)
    original_modules = module_shapes(loaded.model)
    params_before, macs_before = measure(loaded)
    started = time.perf_counter()
    ratio, trials = prune_to_target(
        loaded,
        adapter,
        scores.tensors,
        measure,
        (params_before, macs_before),
        options,
        ratio=settings.ratio,
        target_macs=settings.target_macs,
        target_params=settings.target_params,
        tolerance=settings.tolerance,
        on_trial=on_trial,
    )
    criterion.finalize(loaded.model, seed)
    shape_after = output_shape(loaded, adapter)
    if shape_after != shape_before:
        raise BadInput(f"pruning changed the output shape {shape_before} -> {shape_after}; use --ignore")
    params_after, macs_after = measure(loaded)
    after_rows = layer_rows(loaded)
    layers = []
    for name, before in before_rows.items():
        after = after_rows.get(name, {})
        row = {
            "name": name,
            "type": before["type"],
            "params_before": before["params"],
            "params_after": after.get("params", 0),
            "macs_before": before["macs"],
            "macs_after": after.get("macs", 0),
        }
        for side in ("in_channels", "out_channels", "heads"):
            if side in before:
                row[f"original_{side}"] = before[side]
                row[side] = after.get(side)
        if row.get("original_out_channels"):
            row["sparsity"] = 1 - (row.get("out_channels") or 0) / row["original_out_channels"]
        layers.append(row)
    return {
        "model": loaded.source,
        "criterion": scores.criterion,
        "ratio": ratio,
        "target_macs": settings.target_macs,
        "target_params": settings.target_params,
        "trials": [vars(t) for t in trials],
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_fraction": macs_after / macs_before,
        "params_fraction": params_after / params_before,
        "cutoff": scores.scan.cutoff if scores.scan else None,
        "prune_seconds": time.perf_counter() - started,
        "layers": layers,
        "original_modules": original_modules,
    }


def pruned_metadata(report: dict, scores: Scores, settings: PruneSettings, options: PruneOptions) -> dict:
    """What the pruned-model folder records about how it was made."""
    pruning = {
        "criterion": scores.criterion,
        "cutoff": report["cutoff"],
        "ratio": report["ratio"],
        "target_macs": settings.target_macs,
        "target_params": settings.target_params,
        "scores": scores.settings,
        "ignore": options.ignore,
        "round_to": options.round_to,
        "head_ratio": options.head_ratio,
    }
    sizes = {k: report[k] for k in ("params_before", "params_after", "macs_before", "macs_after")}
    return {
        "pruning": pruning,
        "sizes": sizes,
        "original_modules": report["original_modules"],
        "history": [{"step": "prune", "criterion": scores.criterion, "ratio": report["ratio"], **sizes}],
    }
