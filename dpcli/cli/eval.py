"""``dp eval``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.options import (
    Adapter,
    BatchSize,
    CaptionColumn,
    ClassLabels,
    Config,
    Data,
    Device,
    Force,
    GuidanceScale,
    ImageColumn,
    Json,
    LabelColumn,
    LatencyBatch,
    MaxParams,
    ModelArgument,
    NegativePrompt,
    NoLatency,
    NumSamples,
    Output,
    Precision,
    PromptsFile,
    Repeats,
    SamplerName,
    SamplingPrompts,
    SamplingSteps,
    Scheduler,
    Seed,
    Spacing,
    Split,
)

Reference = Annotated[
    str | None,
    typer.Option("--reference", help="Model to compare images with, from the same noise (SSIM, PSNR)."),
]
FidStatsFile = Annotated[
    Path | None,
    typer.Option(
        "--fid-stats", help="FID against saved statistics (dp eval --save-stats, or a .npz mu/sigma)."
    ),
]
InceptionWeights = Annotated[
    Path | None,
    typer.Option(
        "--inception-weights",
        help="torch-fidelity's Inception-v3 weights file (default: the torch hub cache; never downloaded).",
    ),
]
ClipModel = Annotated[
    str | None,
    typer.Option(
        "--clip-model",
        help="Text models: CLIP model for the CLIP score, a local folder or a Hub id in the Hugging Face cache "
        "(default openai/clip-vit-large-patch14 when cached; never downloaded).",
    ),
]
SaveStats = Annotated[
    Path | None, typer.Option("--save-stats", help="Write the FID statistics of --data to this file.")
]


def evaluate(
    context: typer.Context,
    model: ModelArgument,
    reference: Reference = None,
    num_samples: NumSamples = 256,
    steps: SamplingSteps = 100,
    spacing: Spacing = "uniform",
    sampler: SamplerName = "ddim",
    seed: Seed = 0,
    prompt: SamplingPrompts = None,
    prompts: PromptsFile = None,
    negative_prompt: NegativePrompt = None,
    guidance_scale: GuidanceScale = None,
    class_label: ClassLabels = None,
    clip_model: ClipModel = None,
    batch_size: BatchSize = 64,
    data: Data = None,
    split: Split = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
    label_column: LabelColumn = None,
    fid_stats: FidStatsFile = None,
    inception_weights: InceptionWeights = None,
    save_stats: SaveStats = None,
    latency_batch: LatencyBatch = 64,
    repeats: Repeats = 5,
    no_latency: NoLatency = False,
    device: Device = None,
    precision: Precision = "auto",
    output: Output = None,
    force: Force = False,
    adapter: Adapter = None,
    config: Config = None,
    scheduler: Scheduler = None,
    max_params: MaxParams = None,
    json_output: Json = False,
) -> None:
    """Sample a model: latency, FID against --data, CLIP score for text models, SSIM/PSNR to --reference from
    the same noise and prompts, a grid; the report records the protocol that makes the numbers reproducible."""
    from dpcli.cli import render as out
    from dpcli.cli.common import limit_params, lock_output
    from dpcli.cli.render.eval import render_eval
    from dpcli.conditions import ConditioningRequest
    from dpcli.data.base import data_spec
    from dpcli.errors import BadInput
    from dpcli.io.files import AtomicFolder, prepare_output
    from dpcli.jobs.evaluate import EvalSettings, LatencySettings, write_eval_output
    from dpcli.jobs.evaluate import evaluate as run_eval
    from dpcli.runtime import start_distributed
    from dpcli.sampling import SamplerSettings

    limit_params(context, max_params)

    if output is not None:
        lock_output(context, output)
        prepare_output(output, force)
    if save_stats is not None:
        lock_output(context, save_stats)
    if save_stats is not None and save_stats.exists() and not force:
        raise BadInput(f"--save-stats {save_stats} exists (use --force to replace it)")
    settings = EvalSettings(
        model=model,
        reference=reference,
        num_samples=num_samples,
        sampling=SamplerSettings(
            sampler=sampler or "ddim",
            steps=steps or 100,
            spacing=spacing or "uniform",
            seed=seed,
            batch_size=batch_size,
            precision=precision,
        ),
        latency=None if no_latency else LatencySettings(batch=latency_batch, repeats=repeats),
        data=data_spec(data, split, image_column, caption_column, label_column),
        fid_stats=fid_stats,
        inception_weights=inception_weights,
        save_stats=save_stats,
        device=device,
        adapter=adapter,
        config=config,
        scheduler=scheduler,
        conditioning=ConditioningRequest(
            prompts=list(prompt or []),
            prompts_file=prompts,
            negative_prompt=negative_prompt,
            guidance_scale=guidance_scale,
            class_labels=list(class_label or []),
        ),
        clip_model=clip_model,
    )
    dist = start_distributed()
    rank = dist.rank
    try:
        with out.progress_tasks(enabled=rank == 0) as progress:
            report = run_eval(settings, progress, status=out.info if rank == 0 else None)
        if report is None:
            return
        if output is not None:
            with AtomicFolder(output, force=force) as folder:
                write_eval_output(report, folder, final=Path(output))
        if json_output:
            out.print_json(report.to_json())
        else:
            render_eval(report.to_json())
    finally:
        dist.close()
