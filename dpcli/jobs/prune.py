"""The prune job: prune a model with scores to a ratio or a MACs/params target; what the pruned folder records."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput, BadSetting
from dpcli.flops import count_params
from dpcli.io.model_format import module_shapes
from dpcli.jobs.score import Scores, ScoreSettings, check_threshold
from dpcli.pruning import PruneOptions, output_shape, prune_to_target
from dpcli.reporting import Reporter, silent


def measure(loaded: LoadedModel) -> tuple[int, int]:
    """(params, MACs) of ``loaded`` at batch 1, native size."""
    from dpcli.inspection import macs_of

    return count_params(loaded.model), macs_of(loaded).total


def measure_layers(loaded: LoadedModel) -> tuple[int, int, dict[str, dict]]:
    """(params, MACs, per-layer rows by layer name) of ``loaded`` from one fvcore count (an SDXL-size
    trace is a minute of CPU: counted once before and once after pruning)."""
    from dpcli.inspection import layer_rows as rows_of
    from dpcli.inspection import macs_of

    macs = macs_of(loaded)
    rows = {row.pop("name"): row for row in rows_of(loaded, macs)}
    return count_params(loaded.model), macs.total, rows


@dataclass
class PruneSettings(ScoreSettings):
    """``dp prune``'s settings, named as its options: one target (``ratio``, ``target_macs``,
    ``target_params``) and ``tolerance``, the pruning options (``ignore``, ``round_to``, ``head_ratio``:
    all unset means those the given scores were computed with), and ``dp score``'s settings for when prune
    computes the scores itself (``criterion`` has no default: it names the scores wanted)."""

    criterion: str | None = None
    head_ratio: float | None = None
    ratio: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    tolerance: float = 0.05
    layout: str = "free"

    def validate(self, scores_given: bool = False) -> None:
        """The target, and the scoring settings: all of them when prune scores, the threshold when the
        scores are given (recorded with them, but a value out of range is still a mistake)."""
        validate_prune_settings(self)
        if scores_given:
            check_threshold(self.threshold)
        else:
            self.score_settings().validate()

    def score_settings(self) -> ScoreSettings:
        """The settings of the scores prune computes when none are given."""
        if self.criterion is None:
            raise BadSetting("criterion", "give {criterion} (or scores) to prune")
        shared = {f.name: getattr(self, f.name) for f in fields(ScoreSettings)}
        return ScoreSettings(**{**shared, "head_ratio": self.head_ratio or 0.0})

    def pruning_options(self, scores: Scores) -> PruneOptions:
        """The options given, else (none given) those ``scores`` were computed with."""
        if self.ignore is None and self.round_to is None and not self.head_ratio:
            return scores.recorded_options()
        return self.options


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
    bad_samples: list[dict] = field(default_factory=list)  # calibration images skipped as unreadable
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
            "bad_samples": self.bad_samples,
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
    original_modules = module_shapes(loaded.model)
    params_before, macs_before, before_rows = measure_layers(loaded)
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
    params_after, macs_after, after_rows = measure_layers(loaded)
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
        bad_samples=scores.settings.get("bad_samples", []),
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


def run(
    loaded: LoadedModel,
    settings: PruneSettings,
    *,
    scores: Scores | Path | str | None = None,
    output: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> PruneReport | None:
    """The prune job: score ``loaded`` (unless ``scores``, computed or a file ``dp score`` wrote, are given;
    the scan runs on ``settings.device``, shared out under torchrun), prune it in place, record how in
    ``loaded.record`` and write the pruned folder to ``output`` (locked, atomically; an existing
    non-empty folder needs ``force``). Returns the report; None on torchrun ranks
    other than 0, which end after the scan."""
    from dpcli.io.files import AtomicFolder, output_lock, prepare_output
    from dpcli.io.model_format import recorded_metadata
    from dpcli.jobs.score import load_scores, scan_and_score
    from dpcli.runtime import check_precision, start_distributed
    from dpcli.scoring import place

    reporter = silent(reporter)
    settings.validate(scores_given=scores is not None)
    output = Path(output) if output is not None else None
    dist = start_distributed(settings.device)
    try:
        if scores is not None and not dist.is_main:
            return None  # nothing to share: rank 0 prunes from the scores
        check_precision(settings.precision, dist.device)
        with output_lock(output, on_note=reporter.warn) if output is not None else contextlib.nullcontext():
            if output is not None:
                prepare_output(output, force)
            place(loaded, dist.device)  # the scan, the target search's trials and the pruning all run there
            if isinstance(scores, (str, Path)):
                scores = load_scores(Path(scores), loaded)
            if scores is not None:
                check_given_scores(loaded, scores, settings.criterion)
            else:
                scores = scan_and_score(
                    loaded, settings.score_settings(), dist, reporter if dist.is_main else Reporter()
                )
            if not dist.is_main:
                return None
            options = settings.pruning_options(scores)
            reporter.status("Pruning")
            report = prune_model(
                loaded,
                scores,
                settings,
                options,
                seed=settings.seed,
                on_trial=lambda trial: reporter.status(
                    f"Searching the ratio: {trial.ratio:.3f} -> {trial.params:,} params, {trial.macs:,} MACs"
                ),
            )
            record = pruned_metadata(report, scores, settings, options)
            if output is not None:
                reporter.status(f"Writing {output}")
                with AtomicFolder(output, force=force) as folder:
                    loaded.adapter.save(loaded, folder, record)
            loaded.record = recorded_metadata(loaded, record)
    finally:
        dist.close()
    return report


def check_given_scores(loaded: LoadedModel, scores: Scores, criterion: str | None) -> None:
    """Given scores must be of ``criterion`` (when one is named) and of a model of ``loaded``'s shape."""
    from dpcli.io.model_format import model_signature

    if criterion is not None and criterion != scores.criterion:
        raise BadSetting(
            "criterion",
            "{criterion} {given} differs from the scores' criterion {recorded}",
            given=criterion,
            recorded=scores.criterion,
        )
    if scores.model_signature != model_signature(loaded.model):
        raise BadInput(f"the scores were computed for a model of another shape ({loaded.source})")
