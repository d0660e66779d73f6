"""``dp compare``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.options import (
    BatchSize,
    ClassLabels,
    Device,
    Force,
    GuidanceScale,
    Json,
    LatencyBatch,
    MaxParams,
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
    batch_size: BatchSize = 64,
    latency_batch: LatencyBatch = 64,
    repeats: Repeats = 5,
    no_latency: NoLatency = False,
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
    from dpcli.cli import render as out
    from dpcli.cli.common import limit_params, lock_output
    from dpcli.cli.render.compare import render_compare
    from dpcli.conditions import ConditioningRequest
    from dpcli.io.files import AtomicFolder, prepare_output
    from dpcli.jobs.compare import CompareSettings, write_compare_output
    from dpcli.jobs.compare import compare as run_compare
    from dpcli.jobs.evaluate import LatencySettings
    from dpcli.runtime import start_distributed
    from dpcli.sampling import SamplerSettings

    limit_params(context, max_params)

    if output is not None:
        lock_output(context, output)
        prepare_output(output, force)
    request = ConditioningRequest(
        prompts=list(prompt or []),
        prompts_file=prompts,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        class_labels=list(class_label or []),
    )
    explicit = any(value is not None for value in (steps, spacing, sampler, seed)) or not request.is_empty
    settings = CompareSettings(
        models=list(models or []),
        reports=list(report or []),
        num_samples=num_samples,
        sampling=SamplerSettings(
            sampler=sampler or "ddim",
            steps=steps or 100,
            spacing=spacing or "uniform",
            seed=0 if seed is None else seed,
            batch_size=batch_size,
            precision=precision,
        ),
        latency=None if no_latency else LatencySettings(batch=latency_batch, repeats=repeats),
        device=device,
        scheduler=scheduler,
        conditioning=request,
        mixed_protocols=mixed_protocols,
    )
    dist = start_distributed()
    rank = dist.rank
    try:
        with out.progress_tasks(enabled=rank == 0) as progress:
            result = run_compare(
                settings, progress, status=out.info if rank == 0 else None, explicit_sampling=explicit
            )
        if result is None:
            return
        if output is not None:
            with AtomicFolder(output, force=force) as folder:
                write_compare_output(result, folder, final=Path(output))
        if json_output:
            out.print_json(result.to_json())
        else:
            render_compare(result.to_json())
    finally:
        dist.close()
