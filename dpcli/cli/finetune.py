"""``dp finetune``."""

from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.common import api_keywords, call_and_render, default_output
from dpcli.cli.options import (
    DATA_OPTIONS,
    LOAD_OPTIONS,
    BatchSize,
    Force,
    GradientCheckpointing,
    Json,
    ModelArgument,
    Optimizer,
    Output,
    Seed,
    Workers,
    pick,
    with_options,
)
from dpcli.cli.options import RunDevice as Device

Steps = Annotated[
    int,
    typer.Option("--steps", help="Optimizer steps in total (a resumed run counts the steps already done)."),
]
LearningRate = Annotated[float, typer.Option("--lr", help="Peak learning rate of AdamW.")]
Warmup = Annotated[int, typer.Option("--warmup", help="Steps of linear learning-rate warmup.")]
Schedule = Annotated[
    str, typer.Option("--schedule", help="Learning rate after warmup: cosine (decay to 0) or constant.")
]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
EmaDecay = Annotated[
    float, typer.Option("--ema-decay", help="Decay of the weights' exponential moving average.")
]
GradClip = Annotated[
    float, typer.Option("--grad-clip", help="Clip the gradient norm to this (0: no clipping).")
]
GradAccum = Annotated[
    int, typer.Option("--grad-accum", help="Micro-batches accumulated into one optimizer step.")
]
CheckpointEvery = Annotated[
    int, typer.Option("--checkpoint-every", help="Write a checkpoint every N steps (0: only at the end).")
]
KeepCheckpoints = Annotated[
    int, typer.Option("--keep-checkpoints", help="How many recent checkpoints to keep.")
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUTPUT/checkpoints.")
]
Teacher = Annotated[
    str | None,
    typer.Option(
        "--teacher", help="Distil from this model (e.g. the unpruned original): MSE to its prediction."
    ),
]
DistillWeight = Annotated[
    float | None,
    typer.Option("--distill-weight", help="Weight of the distillation loss (default 1 with --teacher)."),
]
Precision = Annotated[
    str, typer.Option("--precision", help="fp32, or bf16/fp16 autocast (fp16 on GPU only).")
]
Reinit = Annotated[
    bool,
    typer.Option("--reinit", help="Re-initialise all weights first: train the (pruned) shape from scratch."),
]
Crop = Annotated[
    str,
    typer.Option("--crop", help="center, or random (a new square of each resized image at every step)."),
]
Flip = Annotated[
    bool,
    typer.Option(
        "--flip/--no-flip",
        help="Flip training images horizontally at random (half of them). Off by default; never for text "
        "or digits.",
    ),
]
CaptionDropout = Annotated[
    float | None,
    typer.Option(
        "--caption-dropout",
        help="Text models: train on the empty prompt this often, for classifier-free guidance (default 0.1).",
    ),
]
CacheLatents = Annotated[
    Path | None,
    typer.Option(
        "--cache-latents",
        help="LDMs: keep each image's autoencoder latents in this folder and reuse them across steps and runs.",
    ),
]
ReportTo = Annotated[
    str | None,
    typer.Option(
        "--report-to",
        help="Also log metrics and validation grids to none, tensorboard (OUTPUT/tensorboard; the default when "
        "installed) or wandb (offline unless WANDB_MODE/WANDB_API_KEY say otherwise).",
        show_default=False,
    ),
]
ValidateEvery = Annotated[
    int,
    typer.Option(
        "--validate-every",
        help="Every N steps and at the end, sample the EMA weights into OUTPUT/validation/step-N.png, with a "
        "small-sample FID when the data allows (0: off).",
    ),
]
ValidationSamples = Annotated[
    int, typer.Option("--validation-samples", help="Images per validation (same noise every time).")
]
ValidationPrompt = Annotated[
    list[str] | None,
    typer.Option(
        "--validation-prompt",
        help="Text models: a prompt to validate with (repeat for more).",
        show_default=False,
    ),
]
Preview = Annotated[
    int,
    typer.Option(
        "--preview", min=0, help="Also write OUTPUT/samples.png: N samples of the result (DDIM, 50 steps)."
    ),
]


@with_options(DATA_OPTIONS, pick(LOAD_OPTIONS, "adapter", "config", "max_params"))
def finetune(
    context: typer.Context,
    model: ModelArgument,
    steps: Steps,
    crop: Crop = "center",
    flip: Flip = False,
    caption_dropout: CaptionDropout = None,
    workers: Workers = None,
    cache_latents: CacheLatents = None,
    output: Output = None,
    batch_size: BatchSize = 16,
    lr: LearningRate = 2e-4,
    warmup: Warmup = 0,
    schedule: Schedule = "cosine",
    weight_decay: WeightDecay = 0.0,
    ema_decay: EmaDecay = 0.999,
    grad_clip: GradClip = 1.0,
    grad_accum: GradAccum = 1,
    checkpoint_every: CheckpointEvery = 500,
    keep_checkpoints: KeepCheckpoints = 2,
    resume: Resume = False,
    seed: Seed = 0,
    teacher: Teacher = None,
    distill_weight: DistillWeight = None,
    precision: Precision = "fp32",
    gradient_checkpointing: GradientCheckpointing = False,
    optimizer: Optimizer = "adamw",
    device: Device = "auto",
    reinit: Reinit = False,
    preview: Preview = 0,
    report_to: ReportTo = None,
    validate_every: ValidateEvery = 0,
    validation_samples: ValidationSamples = 16,
    validation_prompt: ValidationPrompt = None,
    force: Force = False,
    json_output: Json = False,
    **options,
) -> None:
    """Fine-tune (or train) a model with the DDPM loss: EMA, checkpoints, exact --resume, torchrun/DDP.

    Global batch per optimizer step = --batch-size × processes × --grad-accum. Run data-parallel with
    `torchrun --nproc-per-node N -m dpcli finetune ...`. Ctrl-C writes a checkpoint, then stops.

    Watch it while it runs: `tail -f OUTPUT/metrics.jsonl` (one record per step),
    `tensorboard --logdir OUTPUT` (loss, lr, grad norm, validation grids and FID),
    OUTPUT/validation/step-N.png with --validate-every N.
    """
    output = Path(output) if output else default_output(model, "finetuned")
    import dpcli
    from dpcli.cli.render.finetune import render_finetune

    def to_json(tuned) -> dict:
        return tuned.report.to_json(output=output, preview=bool(preview))

    keywords = api_keywords(finetune, {**locals(), **options})
    call_and_render(dpcli.finetune, keywords, render_finetune, json_output, to_json)
