"""``dp compare``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords
from dpcli.cli.options import (
    BatchSize,
    ClassLabels,
    Device,
    Force,
    GuidanceScale,
    Json,
    Latency,
    LatencyBatch,
    MaxParams,
    NegativePrompt,
    NumSamples,
    Output,
    Precision,
    PromptsFile,
    Repeats,
    SamplerName,
    SamplingPrompts,
    SamplingSteps,
    Scheduler,
    Spacing,
)

Models = Annotated[
    list[str] | None,
    typer.Argument(help="Models to compare; the first is the baseline (see dp eval for what MODEL can be)."),
]
Reports = Annotated[
    list[Path] | None,
    typer.Option(
        "--report",
        help="A dp eval report (report.json or its folder) to use instead of sampling; repeatable, "
        "placed after the MODEL arguments.",
    ),
]

MixedProtocols = Annotated[
    bool,
    typer.Option(
        "--mixed-protocols",
        help="Compare --report files evaluated under different protocols (sample count, steps, guidance, "
        "prompts, reference data, ...) instead of refusing; each difference is flagged.",
    ),
]

Summary = Annotated[
    bool,
    typer.Option(
        "--summary",
        help="Print only the headline, one row per model: params, MACs, measured speedup, FID, SSIM to the "
        "first, where its samples are.",
    ),
]


def compare(
    context: typer.Context,
    models: Models = None,
    report: Reports = None,
    num_samples: NumSamples = 8,
    steps: SamplingSteps = None,
    spacing: Spacing = None,
    sampler: SamplerName = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed of the sampling noise.")] = None,
    prompt: SamplingPrompts = None,
    prompts: PromptsFile = None,
    negative_prompt: NegativePrompt = None,
    guidance_scale: GuidanceScale = None,
    class_label: ClassLabels = None,
    mixed_protocols: MixedProtocols = False,
    summary: Summary = False,
    batch_size: BatchSize = 64,
    latency_batch: LatencyBatch = 64,
    repeats: Repeats = 5,
    latency: Latency = True,
    device: Device = None,
    precision: Precision = "auto",
    scheduler: Scheduler = None,
    output: Output = None,
    force: Force = False,
    max_params: MaxParams = None,
    json_output: Json = False,
) -> None:
    """Models side by side: size, MACs, latency, speedup, per-block widths, SSIM/PSNR to the first from the
    same noise, prompts and labels, a grid captioned with what each column was asked for."""
    options = api_keywords(compare, locals())
    import dpcli
    from dpcli.cli import render as out
    from dpcli.cli.render.compare import render_compare, render_compare_summary
    from dpcli.cli.reporter import RichReporter

    with RichReporter() as reporter:
        result = dpcli.compare(**options, reporter=reporter)
    if result is None:
        return
    if json_output:
        out.print_json(result.to_json())
    elif summary:
        render_compare_summary(result.to_json())
    else:
        render_compare(result.to_json())
