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
    HeadRatio,
    Ignore,
    ImageColumn,
    Json,
    LabelColumn,
    MaxParams,
    ModelArgument,
    Output,
    Plot,
    Prompt,
    RoundTo,
    ScanBudget,
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
    workers: Workers = None,
    threshold: Threshold = None,
    batch_size: BatchSize = 256,
    calib_size: CalibSize = None,
    chunk: Chunk = None,
    timesteps: Timesteps = None,
    timestep_stride: TimestepStride = None,
    scan_budget: ScanBudget = None,
    prompt: Prompt = None,
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
    """Compute channel importance (and the per-timestep loss curve with its cutoff); save it for dp prune."""
    from dpcli.cli import render as out
    from dpcli.cli.common import data_spec, limit_params, lock_output, scan_progress
    from dpcli.cli.render.score import render_score
    from dpcli.jobs.score import ScoreSettings, score_model
    from dpcli.loading import load_model
    from dpcli.pruning import PruneOptions

    limit_params(context, max_params)

    target = Path(output) if output else None
    if target is not None and target.is_dir():
        out_error = f"--output {target} is a folder; give a file name such as scores.safetensors"
        from dpcli.errors import BadInput

        raise BadInput(out_error)
    if target is not None:
        lock_output(context, target)
    settings = ScoreSettings(
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
        prompt=prompt,
        workers=workers,
        options=PruneOptions(ignore=list(ignore or []), round_to=round_to, head_ratio=head_ratio),
    )
    settings.validate()  # before the model is loaded
    with out.stderr.status("Loading model"):
        loaded = load_model(model, adapter=adapter, config=config, scheduler=scheduler)
    with scan_progress(loaded, settings) as on_progress:
        report = score_model(loaded, settings, target, plot, on_progress=on_progress).to_json()
    if json_output:
        out.print_json(report)
    else:
        render_score(report)
