"""``dp compare``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords, call_and_render
from dpcli.cli.options import (
    CONDITIONING_OPTIONS,
    LOAD_OPTIONS,
    MEASURING_OPTIONS,
    Json,
    NumSamples,
    SamplerName,
    SamplingSteps,
    Spacing,
    pick,
    with_options,
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

RetimeReports = Annotated[
    bool,
    typer.Option(
        "--retime-reports",
        help="Load each --report's model again and time every model here, one denoising step of each in "
        "turn, instead of taking the latency each report recorded in its own run: speedups free of "
        "run-to-run drift.",
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


@with_options(CONDITIONING_OPTIONS, MEASURING_OPTIONS, pick(LOAD_OPTIONS, "scheduler", "max_params"))
def compare(
    context: typer.Context,
    models: Models = None,
    report: Reports = None,
    num_samples: NumSamples = 8,
    steps: SamplingSteps = None,
    spacing: Spacing = None,
    sampler: SamplerName = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed of the sampling noise.")] = None,
    mixed_protocols: MixedProtocols = False,
    retime_reports: RetimeReports = False,
    summary: Summary = False,
    json_output: Json = False,
    **options,
) -> None:
    """Models side by side: size, MACs, latency, speedup, per-block widths, SSIM/PSNR to the first from the
    same noise, prompts and labels, a grid captioned with what each column was asked for."""
    import dpcli
    from dpcli.cli.render.compare import render_compare, render_compare_summary

    keywords = api_keywords(compare, {**locals(), **options})
    render = render_compare_summary if summary else render_compare
    call_and_render(dpcli.compare, keywords, render, json_output)
