"""``dp eval``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords
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
    Latency,
    LatencyBatch,
    MaxBadFraction,
    MaxParams,
    ModelArgument,
    NegativePrompt,
    NumSamples,
    OnBadSample,
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
    on_bad_sample: OnBadSample = None,
    max_bad_fraction: MaxBadFraction = None,
    fid_stats: FidStatsFile = None,
    inception_weights: InceptionWeights = None,
    save_stats: SaveStats = None,
    latency_batch: LatencyBatch = 64,
    repeats: Repeats = 5,
    latency: Latency = True,
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
    options = api_keywords(evaluate, locals())
    import dpcli
    from dpcli.cli import render as out
    from dpcli.cli.render.eval import render_eval
    from dpcli.cli.reporter import RichReporter

    with RichReporter() as reporter:
        report = dpcli.evaluate(**options, reporter=reporter)
    if report is None:
        return
    if json_output:
        out.print_json(report.to_json())
    else:
        render_eval(report.to_json())
