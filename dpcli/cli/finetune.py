"""``dp finetune``."""

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from dpcli.cli.options import (
    Adapter,
    BatchSize,
    CaptionColumn,
    Config,
    Data,
    Force,
    GradientCheckpointing,
    ImageColumn,
    Json,
    LabelColumn,
    MaxParams,
    ModelArgument,
    Optimizer,
    Output,
    Seed,
    Split,
    Workers,
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
Preview = Annotated[
    int,
    typer.Option(
        "--preview", min=0, help="Also write OUTPUT/samples.png: N samples of the result (DDIM, 50 steps)."
    ),
]


def finetune(
    context: typer.Context,
    model: ModelArgument,
    steps: Steps,
    data: Data = None,
    split: Split = None,
    image_column: ImageColumn = None,
    caption_column: CaptionColumn = None,
    label_column: LabelColumn = None,
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
    force: Force = False,
    adapter: Adapter = None,
    config: Config = None,
    max_params: MaxParams = None,
    json_output: Json = False,
) -> None:
    """Fine-tune (or train) a model with the DDPM loss: EMA, checkpoints, exact --resume, torchrun/DDP.

    Global batch per optimizer step = --batch-size × processes × --grad-accum. Run data-parallel with
    `torchrun --nproc-per-node N -m dpcli finetune ...`. Ctrl-C writes a checkpoint, then stops.
    """
    from dpcli.cli import render as out
    from dpcli.cli.common import default_output, limit_params, lock_output
    from dpcli.cli.render.finetune import render_finetune
    from dpcli.data.base import data_spec
    from dpcli.errors import BadInput
    from dpcli.jobs.finetune.loop import finetune as train
    from dpcli.jobs.finetune.loop import open_training_data, prepare_output_folder, save_finetuned
    from dpcli.jobs.finetune.settings import FinetuneSettings
    from dpcli.loading import load_model
    from dpcli.runtime import start_distributed

    limit_params(context, max_params)

    if not data:
        raise BadInput("--data is required: an image folder, a dataset, tar shards or builtin:digits")
    if distill_weight is None:
        distill_weight = 1.0 if teacher else 0.0
    settings = FinetuneSettings(
        data=data_spec(data, split, image_column, caption_column, label_column),
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        schedule=schedule,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        grad_clip=grad_clip,
        seed=seed,
        precision=precision,
        teacher=teacher,
        distill_weight=distill_weight,
        reinit=reinit,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        crop=crop,
        flip=flip,
        caption_dropout=caption_dropout,
        workers=workers,
        cache_latents=str(cache_latents) if cache_latents else None,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
    )
    target = Path(output) if output else default_output(model, "finetuned")
    lock_output(context, target)
    prepare_output_folder(settings, target, resume, force, {"MODEL": model, "--teacher": teacher})

    dist = start_distributed(device)
    quiet = not dist.is_main
    try:
        with contextlib.nullcontext() if quiet else out.stderr.status("Loading model and data"):
            loaded = load_model(model, adapter=adapter, config=config)
            teacher_model = load_model(teacher) if teacher else None
            source = open_training_data(loaded, settings)
        with contextlib.nullcontext() if quiet else out.progress(extra=("stats",)) as bar:
            on_step = None
            if bar is not None:
                task = bar.add_task("Fine-tuning", total=settings.steps, stats="")

                def on_step(info):
                    stats = (
                        f"loss {info.smoothed_loss:.4f}  lr {info.lr:.2e}  {info.steps_per_second:.2f} it/s"
                    )
                    bar.update(task, completed=info.step, stats=stats)

            result = train(
                loaded,
                source,
                settings,
                target,
                teacher=teacher_model,
                resume=resume,
                dist=dist,
                on_step=on_step,
                on_warning=out.warn,
            )
        if dist.is_main:
            with out.stderr.status("Saving"):
                save_finetuned(loaded, result, target, preview=preview)
        dist.barrier()
    finally:
        dist.close()
    if quiet:
        return
    report = result.report.to_json(output=target, preview=bool(preview))
    if json_output:
        out.print_json(report)
    else:
        render_finetune(report)
