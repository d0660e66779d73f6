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
    MaxBadFraction,
    MaxParams,
    ModelArgument,
    OnBadSample,
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
    WeightsDtype,
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
    on_bad_sample: OnBadSample = None,
    max_bad_fraction: MaxBadFraction = None,
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
    weights_dtype: WeightsDtype = None,
    json_output: Json = False,
) -> None:
    """Prune a model to --ratio / --target-macs / --target-params with a criterion; save it safely.

    Under torchrun the scoring scan is shared out over the processes; rank 0 alone prunes, writes and
    prints (the other processes end after the scan)."""
    import os

    import dpcli
    from dpcli.cli import render as out
    from dpcli.cli.common import (
        api_keywords,
        ask_criterion,
        ask_data,
        ask_target,
        confirm_plan,
        default_output,
        interactive,
    )
    from dpcli.cli.render.prune import render_prune
    from dpcli.cli.reporter import RichReporter, is_main_rank
    from dpcli.errors import BadInput
    from dpcli.plugins import get_registry

    can_ask = interactive() and not yes and not json_output and os.environ.get("WORLD_SIZE", "1") == "1"
    if criterion is None and scores is None:
        if not can_ask:
            raise BadInput("--criterion is required (or --scores FILE); see dp plugins for the choices")
        criterion = ask_criterion()
    if ratio is None and target_macs is None and target_params is None:
        if not can_ask:
            raise BadInput("give one of --ratio, --target-macs, --target-params")
        target_macs = ask_target()
    if scores is None and data is None and can_ask and get_registry().criterion(criterion).needs_data:
        data = ask_data(criterion)
    output = Path(output) if output else default_output(model, "pruned")
    options = api_keywords(prune, locals())
    with RichReporter() as reporter:
        if can_ask:
            from dpcli.io.files import prepare_output

            prepare_output(output, force)  # before the question, not after it
            loaded = dpcli.load(
                model, adapter, config, scheduler, max_params, weights_dtype=weights_dtype, reporter=reporter
            )
            confirm_plan(loaded.loaded, criterion or f"the scores in {scores}", options, output)
            options = {
                **options,
                "model": loaded,
                **dict.fromkeys(("adapter", "config", "scheduler", "max_params", "weights_dtype")),
            }
        pruned = dpcli.prune(**options, reporter=reporter)
    if not is_main_rank():
        return
    report = pruned.report.to_json(output=output)
    if json_output:
        out.print_json(report)
    else:
        render_prune(report)
