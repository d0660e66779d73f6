"""``dp score``."""

from pathlib import Path

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
    json_output: Json = False,
) -> None:
    """Compute channel importance (and the per-timestep loss curve with its cutoff); save it for dp prune.

    Under torchrun the calibration images are shared out over the processes; rank 0 writes and prints."""
    import contextlib

    from dpcli.cli import render as out
    from dpcli.cli.common import limit_params, lock_output, scan_progress
    from dpcli.cli.render.score import render_score
    from dpcli.data.base import data_spec
    from dpcli.errors import BadInput
    from dpcli.jobs.score import ScoreSettings, score_model
    from dpcli.loading import load_model
    from dpcli.pruning import PruneOptions
    from dpcli.runtime import check_precision, start_distributed

    limit_params(context, max_params)

    target = Path(output) if output else None
    if target is not None and target.is_dir():
        raise BadInput(f"--output {target} is a folder; give a file name such as scores.safetensors")
    settings = ScoreSettings(
        criterion=criterion,
        data=data_spec(
            data, split, image_column, caption_column, label_column, on_bad_sample, max_bad_fraction
        ),
        threshold=threshold,
        calib_size=calib_size,
        batch_size=batch_size,
        chunk=chunk,
        timesteps=timesteps,
        timestep_stride=timestep_stride,
        scan_budget=scan_budget,
        seed=seed,
        prompt=prompt,
        workers=workers,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        options=PruneOptions(ignore=list(ignore or []), round_to=round_to, head_ratio=head_ratio),
    )
    settings.validate()  # before the model is loaded
    dist = start_distributed(device)
    context.call_on_close(dist.close)
    check_precision(precision, dist.device)
    if target is not None and dist.is_main:
        lock_output(context, target)
    with out.stderr.status("Loading model") if dist.is_main else contextlib.nullcontext():
        loaded = load_model(model, adapter=adapter, config=config, scheduler=scheduler)
    progress = scan_progress(loaded, settings) if dist.is_main else contextlib.nullcontext()
    with progress as on_progress:
        report = score_model(loaded, settings, target, plot, on_progress=on_progress, dist=dist)
    if not dist.is_main:
        return
    if json_output:
        out.print_json(report.to_json())
    else:
        render_score(report.to_json())
