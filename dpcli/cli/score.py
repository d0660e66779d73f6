"""``dp score``."""

import typer

from dpcli.cli.common import api_keywords
from dpcli.cli.options import (
    Adapter,
    BatchSize,
    CalibSize,
    CaptionColumn,
    Chunk,
    Config,
    Criterion,
    Data,
    GradientCheckpointing,
    HeadRatio,
    Ignore,
    ImageColumn,
    Json,
    LabelColumn,
    MaxBadFraction,
    MaxParams,
    ModelArgument,
    OnBadSample,
    Output,
    Plot,
    Prompt,
    RoundTo,
    RunDevice,
    ScanBudget,
    ScanPrecision,
    Scheduler,
    Seed,
    Split,
    Threshold,
    Timesteps,
    TimestepStride,
    WeightsDtype,
    Workers,
)


def score(
    context: typer.Context,
    model: ModelArgument,
    criterion: Criterion = "diff-taylor",
    data: Data = None,
    split: Split = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
    label_column: LabelColumn = None,
    on_bad_sample: OnBadSample = None,
    max_bad_fraction: MaxBadFraction = None,
    workers: Workers = None,
    threshold: Threshold = None,
    batch_size: BatchSize = 256,
    calib_size: CalibSize = None,
    chunk: Chunk = None,
    timesteps: Timesteps = None,
    timestep_stride: TimestepStride = None,
    scan_budget: ScanBudget = None,
    prompt: Prompt = None,
    device: RunDevice = "auto",
    precision: ScanPrecision = "fp32",
    gradient_checkpointing: GradientCheckpointing = False,
    seed: Seed = 0,
    ignore: Ignore = None,
    round_to: RoundTo = None,
    head_ratio: HeadRatio = 0.0,
    output: Output = None,
    plot: Plot = None,
    adapter: Adapter = None,
    config: Config = None,
    scheduler: Scheduler = None,
    max_params: MaxParams = None,
    weights_dtype: WeightsDtype = None,
    json_output: Json = False,
) -> None:
    """Compute channel importance (and the per-timestep loss curve with its cutoff); save it for dp prune.

    Under torchrun the calibration images are shared out over the processes; rank 0 writes and prints."""
    options = api_keywords(score, locals())
    import dpcli
    from dpcli.cli import render as out
    from dpcli.cli.render.score import render_score
    from dpcli.cli.reporter import RichReporter, is_main_rank

    with RichReporter() as reporter:
        scores = dpcli.score(**options, reporter=reporter)
    if not is_main_rank():
        return
    if json_output:
        out.print_json(scores.to_json())
    else:
        render_score(scores.to_json())
