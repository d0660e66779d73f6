"""The prune job: prune a model with scores to a ratio or a MACs/params target; what the pruned folder records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadSetting
from dpcli.flops import count_params
from dpcli.io.model_format import module_shapes
from dpcli.jobs.score import Scores
from dpcli.pruning import PruneOptions, output_shape, prune_to_target


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
    layout: str = "free"


def validate_prune_settings(settings: PruneSettings) -> None:
    from dpcli.layout import check_layout

    check_layout(settings.layout)
    given = [v for v in (settings.ratio, settings.target_macs, settings.target_params) if v is not None]
    if len(given) != 1:
        raise BadSetting("ratio", "give exactly one of {ratio}, {target_macs}, {target_params}")
    if settings.ratio is not None and not 0.0 <= settings.ratio < 1.0:
        raise BadSetting("ratio", "{ratio} must be in [0, 1)", got=settings.ratio)
    for name, value in (("target_macs", settings.target_macs), ("target_params", settings.target_params)):
        if value is not None and not 0.0 < value < 1.0:
            rule = "is a fraction of the original and must be in (0, 1)"
            raise BadSetting(name, "{" + name + "} " + rule, got=value)


@dataclass
class PruneReport:
    """What a pruning run did. ``to_json()`` is what ``dp prune --json`` prints (and its tables show);
    ``original_modules`` (the widths before pruning) is recorded in the pruned folder, not printed."""

    model: str
    criterion: str
    ratio: float
    target_macs: float | None
    target_params: float | None
    trials: list[dict]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    cutoff: int | None
    prune_seconds: float
    layers: list[dict]
    original_modules: dict = field(repr=False)
    kept_channels: dict = field(repr=False, default_factory=dict)
    layout: str = "free"
    layout_details: dict = field(repr=False, default_factory=dict)

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before

    def to_json(self, output: Path | None = None) -> dict:
        """The report as printed, with the folder the pruned model was written to."""
        return {
            "model": self.model,
            "criterion": self.criterion,
            "ratio": self.ratio,
            "target_macs": self.target_macs,
            "target_params": self.target_params,
            "trials": self.trials,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_fraction": self.macs_fraction,
            "params_fraction": self.params_fraction,
            "cutoff": self.cutoff,
            "prune_seconds": self.prune_seconds,
            "layers": self.layers,
            "layout": self.layout,
            **({"level_widths": self.layout_details["level_widths"]} if self.layout_details else {}),
            "output": str(output) if output is not None else None,
        }


def prune_model(
    loaded: LoadedModel,
    scores: Scores,
    settings: PruneSettings,
    options: PruneOptions,
    seed: int = 0,
    on_trial=None,
) -> PruneReport:
    """Prune ``loaded`` in place with ``scores``; return the report (sizes, ratio, per-layer rows)."""
    from dpcli.plugins import get_registry

    validate_prune_settings(settings)
    criterion = get_registry().criterion(scores.criterion)
    adapter = loaded.adapter
    shape_before = output_shape(loaded, adapter)
    before_rows = layer_rows(loaded)
    original_modules = module_shapes(loaded.model)
    params_before, macs_before = measure(loaded)
    started = time.perf_counter()
    search = prune_to_target
    if settings.layout == "diffusers":
        from dpcli.layout import prune_to_layout as search
    found = search(
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
    ratio, trials, kept = found[:3]
    details = found[3] if len(found) > 3 else {}
    criterion.finalize(loaded.model, seed)
    shape_after = output_shape(loaded, adapter)
    if shape_after != shape_before:
        raise BadSetting(
            "ignore",
            "pruning changed the output shape {before} -> {after}; use {ignore}",
            before=shape_before,
            after=shape_after,
        )
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
    return PruneReport(
        model=loaded.source,
        criterion=scores.criterion,
        ratio=ratio,
        target_macs=settings.target_macs,
        target_params=settings.target_params,
        trials=[t if isinstance(t, dict) else vars(t) for t in trials],
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        cutoff=scores.scan.cutoff if scores.scan else None,
        prune_seconds=time.perf_counter() - started,
        layers=layers,
        original_modules=original_modules,
        kept_channels=kept,
        layout=settings.layout,
        layout_details=details,
    )


def pruned_metadata(
    report: PruneReport, scores: Scores, settings: PruneSettings, options: PruneOptions
) -> dict:
    """What the pruned-model folder records about how it was made."""
    pruning = {
        "criterion": scores.criterion,
        "cutoff": report.cutoff,
        "ratio": report.ratio,
        "target_macs": settings.target_macs,
        "target_params": settings.target_params,
        "scores": scores.settings,
        "ignore": options.ignore,
        "round_to": options.round_to,
        "head_ratio": options.head_ratio,
        # indices into the widths of the model that was pruned, per changed module (kept out/in channels,
        # kept attention heads): weights after = weights before at these indices
        "kept_channels": report.kept_channels,
        "layout": report.layout,
        **({"layout_details": report.layout_details} if report.layout_details else {}),
    }
    sizes = {k: getattr(report, k) for k in ("params_before", "params_after", "macs_before", "macs_after")}
    return {
        "pruning": pruning,
        "sizes": sizes,
        "original_modules": report.original_modules,
        "history": [{"step": "prune", "criterion": scores.criterion, "ratio": report.ratio, **sizes}],
    }
