"""``dp eval``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords, call_and_render
from dpcli.cli.options import (
    CONDITIONING_OPTIONS,
    DATA_OPTIONS,
    LOAD_OPTIONS,
    MEASURING_OPTIONS,
    Json,
    ModelArgument,
    NumSamples,
    SamplerName,
    SamplingSteps,
    Seed,
    Spacing,
    with_options,
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


@with_options(CONDITIONING_OPTIONS, DATA_OPTIONS, MEASURING_OPTIONS, LOAD_OPTIONS)
def evaluate(
    context: typer.Context,
    model: ModelArgument,
    reference: Reference = None,
    num_samples: NumSamples = 256,
    steps: SamplingSteps = 100,
    spacing: Spacing = "uniform",
    sampler: SamplerName = "ddim",
    seed: Seed = 0,
    clip_model: ClipModel = None,
    fid_stats: FidStatsFile = None,
    inception_weights: InceptionWeights = None,
    save_stats: SaveStats = None,
    json_output: Json = False,
    **options,
) -> None:
    """Sample a model: latency, FID against --data, CLIP score for text models, SSIM/PSNR to --reference from
    the same noise and prompts, a grid; the report records the protocol that makes the numbers reproducible."""
    import dpcli
    from dpcli.cli.render.eval import render_eval

    keywords = api_keywords(evaluate, {**locals(), **options})
    call_and_render(dpcli.evaluate, keywords, render_eval, json_output)
