"""``dp prune``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.options import (
    Adapter,
    BatchSize,
    CalibSize,
    CaptionColumn,
    Chunk,
    Config,
    Criterion,
    Data,
    Force,
    GradientCheckpointing,
    HeadRatio,
    Ignore,
    ImageColumn,
    Json,
    LabelColumn,
    Layout,
    MaxParams,
    ModelArgument,
    Output,
    Prompt,
    Ratio,
    RoundTo,
    RunDevice,
    ScanBudget,
    ScanPrecision,
    Scheduler,
    Seed,
    Split,
    TargetMacs,
    TargetParams,
    Threshold,
    Timesteps,
    TimestepStride,
    Workers,
    Yes,
)

ScoresFile = Annotated[
    Path | None, typer.Option("--scores", help="Reuse scores written by dp score instead of computing them.")
]
Tolerance = Annotated[
    float,
    typer.Option("--tolerance", min=0.0, max=1.0, help="How close (relative) a searched target must land."),
]


def prune(
    context: typer.Context,
    model: ModelArgument,
    criterion: Criterion = None,
    ratio: Ratio = None,
    target_macs: TargetMacs = None,
    target_params: TargetParams = None,
    threshold: Threshold = None,
    data: Data = None,
    split: Split = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
    label_column: LabelColumn = None,
    workers: Workers = None,
    scores: ScoresFile = None,
    output: Output = None,
    ignore: Ignore = None,
    round_to: RoundTo = None,
    head_ratio: HeadRatio = 0.0,
    layout: Layout = "free",
    seed: Seed = 0,
    calib_size: CalibSize = None,
    batch_size: BatchSize = 256,
    chunk: Chunk = None,
    timesteps: Timesteps = None,
    timestep_stride: TimestepStride = None,
    scan_budget: ScanBudget = None,
    prompt: Prompt = None,
    device: RunDevice = "auto",
    precision: ScanPrecision = "fp32",
    gradient_checkpointing: GradientCheckpointing = False,
    tolerance: Tolerance = 0.05,
    yes: Yes = False,
    force: Force = False,
    adapter: Adapter = None,
    config: Config = None,
    scheduler: Scheduler = None,
    max_params: MaxParams = None,
    json_output: Json = False,
) -> None:
    """Prune a model to --ratio / --target-macs / --target-params with a criterion; save it safely.

    Under torchrun the scoring scan is shared out over the processes; rank 0 alone prunes, writes and
    prints (the other processes end after the scan)."""
    import contextlib

    from dpcli.cli import render as out
    from dpcli.cli.common import (
        ask_criterion,
        ask_data,
        ask_target,
        confirm_plan,
        default_output,
        interactive,
        limit_params,
        lock_output,
        scan_progress,
    )
    from dpcli.cli.render.prune import render_prune
    from dpcli.data.base import data_spec
    from dpcli.errors import BadInput
    from dpcli.io.files import AtomicFolder, prepare_output
    from dpcli.jobs.prune import PruneSettings, measure, prune_model, pruned_metadata, validate_prune_settings
    from dpcli.jobs.score import ScoreSettings, check_threshold, compute_scores, load_scores
    from dpcli.loading import load_model
    from dpcli.plugins import get_registry
    from dpcli.pruning import PruneOptions
    from dpcli.runtime import check_precision, start_distributed
    from dpcli.scoring import place

    limit_params(context, max_params)

    dist = start_distributed(device)
    context.call_on_close(dist.close)
    can_ask = interactive() and not yes and not json_output and not dist.enabled
    if criterion is None and scores is None:
        if not can_ask:
            raise BadInput("--criterion is required (or --scores FILE); see dp plugins for the choices")
        criterion = ask_criterion()
    settings = PruneSettings(ratio, target_macs, target_params, tolerance, layout)
    if ratio is None and target_macs is None and target_params is None:
        if not can_ask:
            raise BadInput("give one of --ratio, --target-macs, --target-params")
        settings = ask_target(tolerance)
        settings.layout = layout
    validate_prune_settings(settings)
    if scores is None and data is None and can_ask and get_registry().criterion(criterion).needs_data:
        data = ask_data(criterion)
    options = PruneOptions(ignore=list(ignore or []), round_to=round_to, head_ratio=head_ratio)
    if scores is None:
        score_settings = ScoreSettings(
            criterion=criterion,
            data=data_spec(data, split, image_column, caption_column, label_column),
            threshold=threshold,
            calib_size=calib_size,
            batch_size=batch_size,
            chunk=chunk,
            timesteps=timesteps,
            timestep_stride=timestep_stride,
            scan_budget=scan_budget,
            seed=seed,
            options=options,
            prompt=prompt,
            workers=workers,
            precision=precision,
            gradient_checkpointing=gradient_checkpointing,
        )
        score_settings.validate()
    else:
        check_threshold(threshold)  # recorded with the scores, but a value out of range is still a mistake
        if not dist.is_main:
            return  # nothing to share: rank 0 prunes from the file
    check_precision(precision, dist.device)
    target = Path(output) if output else default_output(model, "pruned")
    if dist.is_main:
        lock_output(context, target)
        prepare_output(target, force)

    with out.stderr.status("Loading model") if dist.is_main else contextlib.nullcontext():
        loaded = load_model(model, adapter=adapter, config=config, scheduler=scheduler)
    place(loaded, dist.device)  # the scan, the target search's trials and the pruning all run there
    if scores is not None:
        computed = load_scores(scores, loaded)
        if criterion is not None and criterion != computed.criterion:
            raise BadInput(
                f"--criterion {criterion} differs from the scores file's criterion {computed.criterion}"
            )
        if ignore is None and round_to is None and not head_ratio:
            options = computed.recorded_options()
    else:
        computed = None
    if can_ask:
        params, macs = measure(loaded)
        confirm_plan(loaded, criterion or computed.criterion, settings, params, macs, target)
    if computed is None:
        progress = scan_progress(loaded, score_settings) if dist.is_main else contextlib.nullcontext()
        with progress as on_progress:
            computed = compute_scores(loaded, score_settings, on_progress=on_progress, dist=dist)
    if not dist.is_main:
        return
    with out.stderr.status("Pruning") as status:

        def on_trial(trial):
            status.update(
                f"Searching the ratio: {trial.ratio:.3f} -> {trial.params:,} params, {trial.macs:,} MACs"
            )

        report = prune_model(loaded, computed, settings, options, seed=seed, on_trial=on_trial)
    with AtomicFolder(target, force=force) as folder:
        loaded.adapter.save(loaded, folder, pruned_metadata(report, computed, settings, options))
    report = report.to_json(output=target)
    if json_output:
        out.print_json(report)
    else:
        render_prune(report)
