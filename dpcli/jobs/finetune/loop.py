"""The fine-tuning loop: the Python API behind ``dp finetune``.

The DDPM loss on the adapter's denoiser (pruned or not), AdamW, timm's warmup + decay LR schedule and its
EMA (``timm.utils.ModelEmaV3``), gradient clipping and accumulation, autocast on GPU, optional distillation
from a teacher, checkpoints with exact resume (``checkpoints``), and data parallelism with torch.distributed.

Determinism, and why a resumed or multi-process run equals a plain one:

- The global batch of optimizer step ``s`` is the ``global_batch`` samples at positions
  ``s * global_batch ...`` of an endless stream of epochs, epoch ``e`` being a permutation of the data
  seeded by (seed, e). Its noise and timesteps come from a generator seeded by (seed, s). Nothing depends
  on what ran before step ``s`` except the weights and optimizer state, which checkpoints hold exactly.
- Every rank draws the noise and timesteps of the whole global batch and computes on its own slice:
  micro-step ``k`` of rank ``r`` takes rows ``(k * world_size + r) * batch_size`` onwards. The same global
  batch split over 1 or N processes (or over accumulation steps) is therefore the same computation, up to
  the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpcli.adapters.base import BatchContext, LoadedModel
from dpcli.data import BadSampleLog, ImageTransform, TooManyBadSamples, training_batches
from dpcli.data.loader import mixed_seed
from dpcli.errors import BadInput, BadSetting, DpError
from dpcli.io.files import AtomicFolder, WriteFailed, prepare_output
from dpcli.jobs.finetune.checkpoints import (
    CHECKPOINT_DIR,
    TrainState,
    check_resumable,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    newest_valid_checkpoint,
    remove_unfinished_checkpoints,
    save_checkpoint,
    weights_fingerprint,
)
from dpcli.jobs.finetune.monitor import check_validation, gradient_norm, run_monitor
from dpcli.jobs.finetune.settings import DEFAULT_CAPTION_DROPOUT, FinetuneSettings
from dpcli.runtime import Distributed, autocast

_SUMMARY_WINDOW = 100


# Noise -----------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for the noise and timesteps of optimizer step ``step``."""
    return torch.Generator(device=device).manual_seed(mixed_seed(seed, "noise", step))


# Model helpers ----------------------------------------------------------------------------------


def reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Fresh random weights of the same shapes (the ``reinit`` criterion's re-initialisation)."""
    from dpcli.criteria.builtin import Reinit

    Reinit().finalize(model, seed)


def open_training_data(loaded: LoadedModel, settings: FinetuneSettings):
    """The source ``settings.data`` names, opened and checked against the model (labels for class models,
    captions for all or none for text models) before anything is trained or written."""
    from dpcli.data import open_source

    source = open_source(settings.data)
    loaded.adapter.check_data(loaded, source)
    return source


def caption_dropout(loaded: LoadedModel, settings: FinetuneSettings) -> float:
    """The caption dropout of this run: as set, or the default for text models; refused for other models."""
    text = loaded.adapter.conditioning_spec(loaded).kind == "text"
    if settings.caption_dropout is None:
        return DEFAULT_CAPTION_DROPOUT if text else 0.0
    if settings.caption_dropout > 0 and not text:
        raise BadSetting(
            "caption_dropout",
            "{caption_dropout} applies to text-conditional models; {model} is not one",
            model=loaded.source,
        )
    return settings.caption_dropout


def check_teacher(student: LoadedModel, teacher: LoadedModel) -> None:
    """The teacher must take the student's noisy input and predict a tensor of the student's shape."""
    inputs = student.adapter.example_inputs(student, 1)
    weight = next(teacher.model.parameters())
    with torch.no_grad():
        expected = student.adapter.predict(student, *inputs)
        try:
            moved = [x.to(weight.device) if isinstance(x, torch.Tensor) else x for x in inputs]
            with torch.autocast(
                weight.device.type, dtype=torch.bfloat16, enabled=weight.dtype == torch.bfloat16
            ):
                got = teacher.adapter.predict(teacher, *moved)
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise BadInput(
                f"the teacher {teacher.source} does not take the student's input of shape "
                f"{tuple(inputs[0].shape)}: {str(exc).splitlines()[0]}"
            ) from None
    if tuple(got.shape) != tuple(expected.shape):
        raise BadInput(
            f"the teacher {teacher.source} predicts shape {tuple(got.shape)}, the student "
            f"{tuple(expected.shape)}: distillation needs the same output shape"
        )


def prepare_training_batch(loaded: LoadedModel, batch, cache=None):
    """``(x0, conditioning)`` of a training batch: the adapter encodes the pixels (or takes the latents
    the cache completed) and conditions on the batch's captions and labels."""
    adapter = loaded.adapter
    latents = cache.complete(batch, lambda pixels: adapter.encode_images(loaded, pixels)) if cache else None
    context = BatchContext(
        captions=batch.captions,
        labels=batch.labels,
        latents=latents,
        geometry=batch.geometry,
        text_cache=cache.root if cache else None,
    )
    return adapter.prepare_batch(loaded, batch.pixels if latents is None else None, context)


def check_cacheable(loaded: LoadedModel, settings: FinetuneSettings) -> None:
    """``--cache-latents`` needs a latent model and deterministic crops."""
    if loaded.adapter.autoencoder(loaded) is None:
        raise BadSetting(
            "cache_latents",
            "{cache_latents}: {model} works on pixels, there are no latents to cache",
            model=loaded.source,
        )
    if settings.crop == "random":
        raise BadSetting(
            "cache_latents",
            "{cache_latents} keeps one latent per image and flip; with {crop} random every step crops anew "
            "(use {crop} center)",
        )


def open_latent_cache(loaded: LoadedModel, settings: FinetuneSettings):
    """The ``--cache-latents`` folder for this model's autoencoder and this run's transform."""
    from dpcli.data.latent_cache import LatentCache

    adapter = loaded.adapter
    autoencoder = adapter.autoencoder(loaded)
    transform = ImageTransform(adapter.data_size(loaded), adapter.data_channels(loaded), crop=settings.crop)
    return LatentCache(Path(settings.cache_latents), weights_fingerprint(autoencoder), transform.key())


# Optimizer, schedule, EMA -----------------------------------------------------------------------


def make_lr_schedule(optimizer: torch.optim.Optimizer, settings: FinetuneSettings):
    """timm's per-update schedule: linear warmup from lr/(warmup+1), then cosine decay to 0 over all
    steps, or constant."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    warmup = dict(warmup_t=settings.warmup, warmup_lr_init=settings.lr / (settings.warmup + 1))
    if settings.schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=settings.steps, lr_min=0.0, t_in_epochs=False, **warmup)
    return StepLRScheduler(optimizer, decay_t=settings.steps, decay_rate=1.0, t_in_epochs=False, **warmup)


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# Training ---------------------------------------------------------------------------------------


@dataclass
class StepInfo:
    """What the progress display gets after every optimizer step."""

    step: int
    total: int
    loss: float
    smoothed_loss: float
    lr: float
    steps_per_second: float
    bad_samples: int = 0


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the step, write a checkpoint, stop.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class Interrupted(DpError):
    """Training stopped on request after writing a checkpoint (exit code 130, as for Ctrl-C)."""

    exit_code = 130


def validate(settings: FinetuneSettings, output: Path | None, resume: bool = False) -> None:
    """Fail before anything is loaded or written: bad settings, or ``resume`` with no checkpoint in
    ``output``."""
    settings.validate()
    if resume and output is not None and latest_checkpoint(Path(output)) is None:
        raise BadSetting(
            "resume", "{resume}: no checkpoint in {folder}", folder=checkpoint_root(Path(output))
        )


def prepare_output_folder(
    settings: FinetuneSettings, output: Path, resume: bool, force: bool, inputs: dict[str, str | None]
) -> None:
    """Check everything about OUT before anything is loaded: the settings, ``resume`` with a checkpoint to
    resume, no input (``inputs`` maps a name such as ``MODEL`` to what was given) that is OUT itself, and
    for a fresh run, OUT empty (or ``force``) and holding no earlier run's checkpoints."""
    output = Path(output)
    validate(settings, output, resume)
    for name, spec in inputs.items():
        if spec and Path(spec).exists() and Path(spec).resolve() == output.resolve():
            raise BadSetting(
                "output",
                "{output} {folder} is the {name}: inputs are never modified; choose another folder",
                folder=output,
                name=name,
            )
    if not resume:
        if latest_checkpoint(output) is not None and not force:
            raise BadSetting(
                "resume",
                "{folder} holds checkpoints of an earlier run: add {resume} to continue it, "
                "or {force} to start over",
                folder=output,
            )
        prepare_output(output, force)


def train(
    loaded: LoadedModel,
    source,
    settings: FinetuneSettings,
    output: Path,
    teacher: LoadedModel | None = None,
    resume: bool = False,
    dist: Distributed | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train ``loaded.model`` in place on ``source`` (a ``dpcli.data.Source``; None: open
    ``settings.data``), read through the streaming data layer; checkpoints go to OUT/checkpoints.

    ``resume`` continues from the newest intact checkpoint; each newer one that is corrupt is skipped
    with a line through ``on_warning``. Returns the report, the EMA model and the loss history; raises
    :class:`Interrupted` after writing a checkpoint when stopped with Ctrl-C or SIGTERM.
    """
    from timm.utils import ModelEmaV3

    from dpcli.io.model_format import model_signature
    from dpcli.optimizers import make_optimizer
    from dpcli.scoring import gradient_checkpointing, loss_target

    validate(settings, output, resume)
    dist = dist or Distributed()
    device = dist.device
    if settings.precision == "fp16" and device.type != "cuda":
        raise BadSetting("precision", "{precision} fp16 needs a CUDA GPU (use bf16 or fp32 on the CPU)")
    source = open_training_data(loaded, settings) if source is None else source
    dropout = caption_dropout(loaded, settings)
    if settings.cache_latents:
        check_cacheable(loaded, settings)
    check_validation(loaded, settings)
    global_batch = settings.batch_size * dist.world_size * settings.grad_accum
    if global_batch > len(source):
        raise BadInput(
            f"the global batch ({settings.batch_size} × {dist.world_size} process(es) × "
            f"{settings.grad_accum} accumulation step(s) = {global_batch}) is larger than the data "
            f"({len(source)} images in {settings.data})"
        )
    adapter = loaded.adapter
    cache = open_latent_cache(loaded, settings) if settings.cache_latents else None
    model = loaded.model
    if settings.reinit:
        reinitialise(model, settings.seed)
    record = {
        "model": loaded.source,
        "model_signature": model_signature(model),
        "model_fingerprint": weights_fingerprint(model),
        "settings": {
            **dataclasses.asdict(settings),
            "caption_dropout": dropout,
            "global_batch": global_batch,
        },
    }
    output = Path(output)
    checkpoint = None
    if resume:
        checkpoint, saved_state, skipped = newest_valid_checkpoint(output)
        for why in skipped:
            if on_warning is not None and dist.is_main:
                on_warning(f"skipped a damaged checkpoint: {why}; resuming from {checkpoint.name}")
        check_resumable(saved_state, checkpoint, record)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device).train()
    if teacher is not None:
        # The teacher only runs forward under autocast: at bf16 its weights are held in bf16 (half the memory).
        teacher_dtype = torch.bfloat16 if settings.precision == "bf16" else None
        teacher.model.to(device, dtype=teacher_dtype).eval().requires_grad_(False)
        check_teacher(loaded, teacher)
    optimizer = make_optimizer(settings.optimizer, model.parameters(), settings.lr, settings.weight_decay)
    lr_schedule = make_lr_schedule(optimizer, settings)
    ema = ModelEmaV3(model, decay=settings.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    train = TrainState()
    bad_samples = BadSampleLog(on_warning if dist.is_main else lambda message: None)
    if checkpoint is not None:
        load_checkpoint(checkpoint, saved_state, model, ema, optimizer, lr_schedule, scaler, train, settings)
        bad_samples.load_state(train.bad_samples)
    elif dist.is_main and checkpoint_root(output).exists():
        shutil.rmtree(checkpoint_root(output))  # a fresh run (--force): stale checkpoints must not resume
    if dist.is_main:
        remove_unfinished_checkpoints(output)
    dist.barrier()

    trained = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    training_view = dataclasses.replace(loaded, model=trained)
    teacher_adapter = teacher.adapter if teacher is not None else None
    transform = ImageTransform(
        adapter.data_size(loaded), adapter.data_channels(loaded), crop=settings.crop, flip=settings.flip
    )
    batches = training_batches(
        source,
        transform,
        seed=settings.seed,
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        world_size=dist.world_size,
        rank=dist.rank,
        start_step=train.step,
        steps=settings.steps,
        workers=settings.workers,
        caption_dropout=dropout,
        pin_memory=device.type == "cuda",
        cache=cache,
        bad_samples=bad_samples,
    )
    noise_shape = tuple(adapter.noise_shape(loaded))
    num_timesteps = int(loaded.scheduler.config.num_train_timesteps)
    batch = settings.batch_size
    start_step = train.step
    average = 0.0
    window: list[float] = []
    run_started = time.perf_counter()
    previous_seconds = train.seconds
    interrupted = False
    saved_step = start_step

    saving = (model, ema, optimizer, lr_schedule, scaler, record, settings.keep_checkpoints)
    with (
        _StopRequest() as stop,
        _checkpoint_on_too_many_bad(output, train, saving, lambda: saved_step, dist),
        run_monitor(loaded, settings, output, record, start_step, dist) as monitor,
        gradient_checkpointing(model, settings.gradient_checkpointing),
    ):
        for step in range(start_step, settings.steps):
            step_started = time.perf_counter()
            generator = step_generator(settings.seed, step, device)
            timesteps = torch.randint(0, num_timesteps, (global_batch,), generator=generator, device=device)
            noise = torch.randn((global_batch, *noise_shape), generator=generator, device=device)
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            loss_terms = torch.zeros(2, dtype=torch.float64, device=device)  # DDPM, distillation
            for micro in range(settings.grad_accum):
                first = (micro * dist.world_size + dist.rank) * batch
                rows = slice(first, first + batch)
                x0, conditioning = prepare_training_batch(loaded, next(batches), cache)
                if tuple(x0.shape[1:]) != noise_shape:
                    raise DpError(
                        f"the adapter prepared samples of shape {tuple(x0.shape[1:])}, expected {noise_shape}"
                    )
                t, eps = timesteps[rows], noise[rows].to(x0.dtype)
                last_micro = micro == settings.grad_accum - 1
                sync = contextlib.nullcontext() if last_micro or not dist.enabled else trained.no_sync()
                with sync:
                    with autocast(device, settings.precision):
                        noisy = loaded.scheduler.add_noise(x0, eps, t)
                        prediction = adapter.predict(training_view, noisy, t, conditioning).float()
                    target = loss_target(loaded.scheduler, x0, eps, t).float()
                    loss = ddpm_loss = torch.nn.functional.mse_loss(prediction, target)
                    distill_loss = torch.zeros((), device=device)
                    if teacher is not None and settings.distill_weight > 0:
                        with torch.no_grad(), autocast(device, settings.precision):
                            guide = teacher_adapter.predict(teacher, noisy, t, conditioning).float()
                        distill_loss = torch.nn.functional.mse_loss(prediction, guide)
                        loss = loss + settings.distill_weight * distill_loss
                    scaler.scale(loss / settings.grad_accum).backward()
                step_loss += loss.detach().double() / settings.grad_accum
                loss_terms += torch.stack([ddpm_loss, distill_loss]).detach().double() / settings.grad_accum
            scaler.unscale_(optimizer)
            grad_norm = gradient_norm(model, settings.grad_clip)  # clipped to grad_clip when > 0
            lr = _current_lr(optimizer)
            scaler.step(optimizer)
            scaler.update()
            lr_schedule.step_update(step + 1)
            ema.update(model, step=step + 1)

            stop_flag = torch.tensor(float(stop.requested), device=device).double()
            shared = torch.cat([torch.stack([step_loss, stop_flag]), loss_terms])
            if dist.enabled:
                torch.distributed.all_reduce(shared)
            loss_value = float(shared[0]) / dist.world_size
            if not math.isfinite(loss_value):
                raise DpError(
                    f"the loss is {loss_value} at step {step + 1}: lower --lr, use --grad-clip or fp32"
                )
            train.step = step + 1
            train.losses.append(loss_value)
            train.lrs.append(lr)
            train.seconds = previous_seconds + time.perf_counter() - run_started
            average = 0.98 * average + 0.02 * loss_value
            smoothed = average / (1 - 0.98 ** (train.step - start_step))
            window = [*window[-19:], time.perf_counter() - step_started]
            if on_step is not None and dist.is_main:
                speed = len(window) / sum(window)
                on_step(
                    StepInfo(train.step, settings.steps, loss_value, smoothed, lr, speed, len(bad_samples))
                )
            train.bad_samples = bad_samples.state()  # what the next checkpoint keeps
            stop_now = float(shared[1]) > 0
            # [watch] metrics.jsonl, the tracker and validation (before the checkpoint of this step)
            terms = (shared[2:] / dist.world_size).tolist()
            step_metrics = {
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "images_per_second": global_batch / window[-1],
                "seconds": train.seconds,
            }
            if teacher is not None and settings.distill_weight > 0:
                step_metrics.update(loss_ddpm=terms[0], loss_distill=terms[1])
            monitor.after_step(train.step, step_metrics, ema.module, stop_now)
            due = settings.checkpoint_every and train.step % settings.checkpoint_every == 0
            if due or stop_now or train.step == settings.steps:
                saved_step = train.step
                if dist.is_main:
                    try:
                        save_checkpoint(
                            output,
                            train,
                            model,
                            ema,
                            optimizer,
                            lr_schedule,
                            scaler,
                            record,
                            settings.keep_checkpoints,
                        )
                    except WriteFailed as exc:
                        raise WriteFailed(f"{exc} with --resume") from exc
                dist.barrier()
            if stop_now:
                interrupted = True
                break
    if interrupted:
        raise Interrupted(
            f"interrupted at step {train.step} of {settings.steps}: checkpoint written to "
            f"{checkpoint_root(output)}; continue with the same command and --resume"
        )
    model.eval()
    return FinetuneResult(
        report=_report(
            settings,
            train,
            start_step,
            time.perf_counter() - run_started,
            dist,
            teacher,
            dropout,
            bad_samples,
        ),
        ema_model=ema.module,
        losses=train.losses,
        lrs=train.lrs,
    )


@contextlib.contextmanager
def _checkpoint_on_too_many_bad(output: Path, train: TrainState, saving: tuple, saved_step, dist):
    """Past ``max_bad_fraction`` (every process stops at the same batch): write a checkpoint of the last
    finished step unless one was just written (``saving``: ``save_checkpoint``'s other arguments), then
    exit 2 saying where it is."""
    try:
        yield
    except TooManyBadSamples as exc:
        if train.step > saved_step():
            if dist.is_main:
                save_checkpoint(output, train, *saving)
            dist.barrier()
        written = train.step > 0 and latest_checkpoint(output) is not None
        raise exc.with_checkpoint(checkpoint_root(output)) if written else exc from None


def summary_window(steps: int) -> int:
    """Steps averaged for the reported initial and final loss: 10 % of the run, 1 to 100."""
    return max(1, min(_SUMMARY_WINDOW, steps // 10))


@dataclass
class FinetuneReport:
    """What a fine-tuning run did. ``to_json()`` is what ``dp finetune --json`` prints (and its table
    shows); ``initial_loss``/``final_loss`` are means over the first/last ``loss_window`` steps."""

    steps: int
    resumed_from: int | None
    batch_size: int
    grad_accum: int
    world_size: int
    global_batch: int
    lr: float
    warmup: int
    schedule: str
    weight_decay: float
    ema_decay: float
    grad_clip: float
    precision: str
    device: str
    seed: int
    data: str
    teacher: str | None
    distill_weight: float | None
    reinit: bool
    crop: str
    flip: bool
    caption_dropout: float
    initial_loss: float | None
    final_loss: float | None
    loss_window: int
    seconds: float
    steps_per_second: float | None
    bad_samples: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self, output: Path | None = None, preview: bool = False) -> dict:
        """The report as printed, with the files ``save_finetuned`` wrote into ``output``."""
        output = Path(output) if output is not None else None
        return {
            **dataclasses.asdict(self),
            "output": str(output) if output else None,
            "loss_curve": str(output / "loss.png") if output else None,
            "samples": str(output / "samples.png") if output and preview else None,
            "checkpoints": str(checkpoint_root(output)) if output else None,
        }


@dataclass
class FinetuneResult:
    """A finished run: the report, the EMA model and the per-step loss and learning-rate history."""

    report: FinetuneReport
    ema_model: torch.nn.Module
    losses: list[float]
    lrs: list[float]


def _report(
    settings,
    train: TrainState,
    start_step: int,
    run_seconds: float,
    dist,
    teacher,
    caption_dropout: float,
    bad_samples: BadSampleLog,
) -> FinetuneReport:
    window = summary_window(len(train.losses))
    ran = train.step - start_step
    return FinetuneReport(
        steps=train.step,
        resumed_from=start_step or None,
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        world_size=dist.world_size,
        global_batch=settings.batch_size * dist.world_size * settings.grad_accum,
        lr=settings.lr,
        warmup=settings.warmup,
        schedule=settings.schedule,
        weight_decay=settings.weight_decay,
        ema_decay=settings.ema_decay,
        grad_clip=settings.grad_clip,
        precision=settings.precision,
        device=str(dist.device),
        seed=settings.seed,
        data=str(settings.data),
        teacher=teacher.source if teacher is not None else None,
        distill_weight=settings.distill_weight if teacher is not None else None,
        reinit=settings.reinit,
        crop=settings.crop,
        flip=settings.flip,
        caption_dropout=caption_dropout,
        initial_loss=sum(train.losses[:window]) / window if train.losses else None,
        final_loss=sum(train.losses[-window:]) / window if train.losses else None,
        loss_window=window,
        seconds=train.seconds,
        steps_per_second=ran / run_seconds if ran and run_seconds > 0 else None,
        bad_samples=bad_samples.to_json(),
    )


def history_entry(report: FinetuneReport) -> dict:
    """The ``history`` record a fine-tuned model folder carries."""
    keys = (
        "steps",
        "global_batch",
        "batch_size",
        "grad_accum",
        "world_size",
        "lr",
        "warmup",
        "schedule",
        "weight_decay",
        "ema_decay",
        "grad_clip",
        "precision",
        "seed",
        "data",
        "teacher",
        "distill_weight",
        "reinit",
        "crop",
        "flip",
        "caption_dropout",
        "initial_loss",
        "final_loss",
        "seconds",
    )
    entry = {"step": "finetune", **{key: getattr(report, key) for key in keys}}
    return {**entry, "weights": "ema", "raw_weights": "unet/raw.safetensors"}


def save_finetuned(loaded: LoadedModel, result: FinetuneResult, output: Path, preview: int = 0) -> Path:
    """Write the fine-tuned model into OUT (EMA weights as the main weights, the raw ones as
    ``unet/raw.safetensors``), its loss curve and optional sample preview, and move the checkpoints in:
    the model files appear in OUT only now."""
    from dpcli.io.model_card import update_model_card
    from dpcli.jobs.finetune.monitor import carry_run_files, curves_text
    from dpcli.plots import grid_rows, plot_training, save_image_grid

    output = Path(output)
    raw = {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    ema_view = dataclasses.replace(loaded, model=result.ema_model.eval())
    metadata = {"history": [history_entry(result.report)], "extra_weights": {"raw.safetensors": raw}}
    with _resumable_on_failure(), AtomicFolder(output, force=True) as folder:
        loaded.adapter.save(ema_view, folder, metadata)
        plot_training(result.losses, result.lrs, folder / "loss.png", title=f"dp finetune {loaded.source}")
        if preview:
            pixels = preview_samples(ema_view, preview, seed=result.report.seed)
            save_image_grid(grid_rows(pixels), folder / "samples.png")
        checkpoints = checkpoint_root(output)
        if checkpoints.is_dir():
            os.replace(checkpoints, folder / CHECKPOINT_DIR)
        moved = carry_run_files(output, folder)  # [watch] metrics, validation grids, tracker logs
        update_model_card(folder, "curves", curves_text(moved), "Training curves")
    return output


@contextlib.contextmanager
def _resumable_on_failure():
    """A failed write of the final model leaves the checkpoints in OUT: say how to finish the run."""
    try:
        yield
    except WriteFailed as exc:
        raise WriteFailed(f"{exc} with --resume") from exc


# Previews ---------------------------------------------------------------------------------------


def preview_samples(loaded: LoadedModel, count: int = 16, seed: int = 0, steps: int = 50) -> torch.Tensor:
    """A quick look at what the model generates: ``dp eval``'s sampler, deterministic DDIM (eta 0,
    ``steps`` uniform steps) in fp32 on the model's device. uint8 images, [count, C, H, W], on the CPU."""
    from dpcli.sampling import Sampler, SamplerSettings, to_uint8

    settings = SamplerSettings(steps=steps, seed=seed, batch_size=count, precision="fp32")
    device = next(loaded.model.parameters()).device
    return to_uint8(Sampler(loaded, settings, device=device).sample(range(count)))
