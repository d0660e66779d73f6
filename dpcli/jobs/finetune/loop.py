"""The fine-tuning loop behind ``dpcli.finetune`` and ``dp finetune``.

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


@dataclass
class _Run:
    """What ``_setup`` prepares for the steps of a run: the model (``trained`` wraps it in DDP when
    distributed), its optimizer, schedule, EMA and grad scaler, the resumable state, the batches and the
    record checkpoints carry (``_run_record``)."""

    loaded: LoadedModel
    settings: FinetuneSettings
    output: Path
    dist: Distributed
    teacher: LoadedModel | None
    record: dict
    dropout: float
    bad_samples: BadSampleLog
    cache: object = None
    batches: object = None
    state: TrainState = dataclasses.field(default_factory=TrainState)
    trained: torch.nn.Module = dataclasses.field(init=False)
    optimizer: torch.optim.Optimizer = dataclasses.field(init=False)
    lr_schedule: object = dataclasses.field(init=False)
    ema: object = dataclasses.field(init=False)
    scaler: torch.amp.GradScaler = dataclasses.field(init=False)

    def __post_init__(self):
        """The optimizer, LR schedule, EMA and grad scaler of the model (on its device by now); ``trained``
        is the model until ``_setup`` wraps it for data parallelism."""
        from timm.utils import ModelEmaV3

        from dpcli.optimizers import make_optimizer

        model, settings = self.loaded.model, self.settings
        self.trained = model
        self.optimizer = make_optimizer(
            settings.optimizer, model.parameters(), settings.lr, settings.weight_decay
        )
        self.lr_schedule = make_lr_schedule(self.optimizer, settings)
        self.ema = ModelEmaV3(model, decay=settings.ema_decay)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=settings.precision == "fp16")

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: ``batch_size × world_size × grad_accum``."""
        return self.settings.batch_size * self.dist.world_size * self.settings.grad_accum

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and self.settings.distill_weight > 0

    def save_checkpoint(self) -> None:
        save_checkpoint(
            self.output,
            self.state,
            self.model,
            self.ema,
            self.optimizer,
            self.lr_schedule,
            self.scaler,
            self.record,
            self.settings.keep_checkpoints,
        )


@dataclass
class _Clock:
    """The timing and smoothed loss of the steps this process runs (a resumed run adds to the time of
    the run it continues)."""

    start_step: int
    previous_seconds: float
    started: float = dataclasses.field(default_factory=time.perf_counter)
    average: float = 0.0
    window: list[float] = dataclasses.field(default_factory=list)

    def seconds(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.started

    def smoothed(self, loss: float, step: int) -> float:
        self.average = 0.98 * self.average + 0.02 * loss
        return self.average / (1 - 0.98 ** (step - self.start_step))


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
    from dpcli.scoring import gradient_checkpointing

    validate(settings, output, resume)
    run = _setup(loaded, source, settings, Path(output), teacher, resume, dist or Distributed(), on_warning)
    state = run.state
    clock = _Clock(state.step, state.seconds)
    saved_step = state.step
    interrupted = False
    with (
        _StopRequest() as stop,
        _checkpoint_on_too_many_bad(run, lambda: saved_step),
        run_monitor(loaded, settings, run.output, run.record, state.step, run.dist) as monitor,
        gradient_checkpointing(run.model, settings.gradient_checkpointing),
    ):
        for step in range(state.step, settings.steps):
            step_started = time.perf_counter()
            metrics, stop_now = _train_step(run, step, stop.requested)
            clock.window = [*clock.window[-19:], time.perf_counter() - step_started]
            _record_step(run, step, metrics, clock, on_step)
            monitor.after_step(state.step, metrics, run.ema.module, stop_now)
            due = settings.checkpoint_every and state.step % settings.checkpoint_every == 0
            if due or stop_now or state.step == settings.steps:
                saved_step = state.step
                if run.dist.is_main:
                    try:
                        run.save_checkpoint()
                    except WriteFailed as exc:
                        raise WriteFailed(f"{exc} with --resume") from exc
                run.dist.barrier()
            if stop_now:
                interrupted = True
                break
    if interrupted:
        raise Interrupted(
            f"interrupted at step {state.step} of {settings.steps}: checkpoint written to "
            f"{checkpoint_root(run.output)}; continue with the same command and --resume"
        )
    run.model.eval()
    report = _report(run, clock.start_step, time.perf_counter() - clock.started)
    return FinetuneResult(report=report, ema_model=run.ema.module, losses=state.losses, lrs=state.lrs)


def _setup(
    loaded: LoadedModel,
    source,
    settings: FinetuneSettings,
    output: Path,
    teacher: LoadedModel | None,
    resume: bool,
    dist: Distributed,
    on_warning: Callable[[str], None] | None,
) -> _Run:
    """Everything before the first step: the checks of the data and the settings against the model, the
    run's record, the optimizer, schedule, EMA and grad scaler (from the newest intact checkpoint when
    resuming), the teacher and the batches."""
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
    model = loaded.model
    if settings.reinit:
        reinitialise(model, settings.seed)
    record = _run_record(loaded, settings, dropout, global_batch)
    checkpoint = saved_state = None
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
    run = _Run(
        loaded,
        settings,
        output,
        dist,
        teacher,
        record=record,
        dropout=dropout,
        bad_samples=BadSampleLog(on_warning if dist.is_main else lambda message: None),
        cache=open_latent_cache(loaded, settings) if settings.cache_latents else None,
    )
    _restore(run, checkpoint, saved_state)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run.trained = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run.batches = _training_batches(run, source)
    return run


def _run_record(loaded: LoadedModel, settings: FinetuneSettings, dropout: float, global_batch: int) -> dict:
    """What checkpoints carry about the run: the model it started from (shape and weights) and its settings
    as resolved (``check_resumable`` compares them on resume)."""
    from dpcli.io.model_format import model_signature

    return {
        "model": loaded.source,
        "model_signature": model_signature(loaded.model),
        "model_fingerprint": weights_fingerprint(loaded.model),
        "settings": {
            **dataclasses.asdict(settings),
            "caption_dropout": dropout,
            "global_batch": global_batch,
        },
    }


def _restore(run: _Run, checkpoint: Path | None, saved_state: dict | None) -> None:
    """Load ``checkpoint`` into the run, or for a fresh run remove an earlier run's checkpoints (--force:
    they must not resume); drop unfinished checkpoint writes either way."""
    if checkpoint is not None:
        load_checkpoint(
            checkpoint,
            saved_state,
            run.model,
            run.ema,
            run.optimizer,
            run.lr_schedule,
            run.scaler,
            run.state,
            run.settings,
        )
        run.bad_samples.load_state(run.state.bad_samples)
    elif run.dist.is_main and checkpoint_root(run.output).exists():
        shutil.rmtree(checkpoint_root(run.output))
    if run.dist.is_main:
        remove_unfinished_checkpoints(run.output)
    run.dist.barrier()


def _training_batches(run: _Run, source):
    """This process's micro-batches from the run's resumed step on (``dpcli.data.training_batches``)."""
    loaded, settings, dist = run.loaded, run.settings, run.dist
    adapter = loaded.adapter
    transform = ImageTransform(
        adapter.data_size(loaded), adapter.data_channels(loaded), crop=settings.crop, flip=settings.flip
    )
    return training_batches(
        source,
        transform,
        seed=settings.seed,
        batch_size=settings.batch_size,
        grad_accum=settings.grad_accum,
        world_size=dist.world_size,
        rank=dist.rank,
        start_step=run.state.step,
        steps=settings.steps,
        workers=settings.workers,
        caption_dropout=run.dropout,
        pin_memory=dist.device.type == "cuda",
        cache=run.cache,
        bad_samples=run.bad_samples,
    )


def _train_step(run: _Run, step: int, stop_requested: bool) -> tuple[dict, bool]:
    """One optimizer step (``grad_accum`` micro-steps on this process's rows of the global batch, the
    gradients summed over the processes). Returns the step's metrics, the same on every process, and
    whether any process was asked to stop."""
    from dpcli.scoring import loss_target

    loaded, settings, dist = run.loaded, run.settings, run.dist
    device, adapter = dist.device, loaded.adapter
    noise_shape = tuple(adapter.noise_shape(loaded))
    num_timesteps = int(loaded.scheduler.config.num_train_timesteps)
    training_view = dataclasses.replace(loaded, model=run.trained)
    generator = step_generator(settings.seed, step, device)
    timesteps = torch.randint(0, num_timesteps, (run.global_batch,), generator=generator, device=device)
    noise = torch.randn((run.global_batch, *noise_shape), generator=generator, device=device)
    run.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    loss_terms = torch.zeros(2, dtype=torch.float64, device=device)  # DDPM, distillation
    for micro in range(settings.grad_accum):
        first = (micro * dist.world_size + dist.rank) * settings.batch_size
        rows = slice(first, first + settings.batch_size)
        x0, conditioning = prepare_training_batch(loaded, next(run.batches), run.cache)
        if tuple(x0.shape[1:]) != noise_shape:
            raise DpError(
                f"the adapter prepared samples of shape {tuple(x0.shape[1:])}, expected {noise_shape}"
            )
        t, eps = timesteps[rows], noise[rows].to(x0.dtype)
        last_micro = micro == settings.grad_accum - 1
        sync = contextlib.nullcontext() if last_micro or not dist.enabled else run.trained.no_sync()
        with sync:
            with autocast(device, settings.precision):
                noisy = loaded.scheduler.add_noise(x0, eps, t)
                prediction = adapter.predict(training_view, noisy, t, conditioning).float()
            target = loss_target(loaded.scheduler, x0, eps, t).float()
            loss = ddpm_loss = torch.nn.functional.mse_loss(prediction, target)
            distill_loss = torch.zeros((), device=device)
            if run.distilling:
                with torch.no_grad(), autocast(device, settings.precision):
                    guide = run.teacher.adapter.predict(run.teacher, noisy, t, conditioning).float()
                distill_loss = torch.nn.functional.mse_loss(prediction, guide)
                loss = loss + settings.distill_weight * distill_loss
            run.scaler.scale(loss / settings.grad_accum).backward()
        step_loss += loss.detach().double() / settings.grad_accum
        loss_terms += torch.stack([ddpm_loss, distill_loss]).detach().double() / settings.grad_accum
    run.scaler.unscale_(run.optimizer)
    grad_norm = gradient_norm(run.model, settings.grad_clip)  # clipped to grad_clip when > 0
    lr = _current_lr(run.optimizer)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.lr_schedule.step_update(step + 1)
    run.ema.update(run.model, step=step + 1)

    stop_flag = torch.tensor(float(stop_requested), device=device).double()
    shared = torch.cat([torch.stack([step_loss, stop_flag]), loss_terms])
    if dist.enabled:
        torch.distributed.all_reduce(shared)
    loss_value = float(shared[0]) / dist.world_size
    if not math.isfinite(loss_value):
        raise DpError(f"the loss is {loss_value} at step {step + 1}: lower --lr, use --grad-clip or fp32")
    metrics = {"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm)}
    if run.distilling:
        terms = (shared[2:] / dist.world_size).tolist()
        metrics.update(loss_ddpm=terms[0], loss_distill=terms[1])
    return metrics, float(shared[1]) > 0


def _record_step(run: _Run, step: int, metrics: dict, clock: _Clock, on_step) -> None:
    """Add a finished step to the run's state (what the next checkpoint keeps) and to ``metrics`` (what
    [watch] logs: metrics.jsonl, the tracker), and show it through ``on_step`` on the main process."""
    state = run.state
    loss_value, lr = metrics["loss"], metrics["lr"]
    state.step = step + 1
    state.losses.append(loss_value)
    state.lrs.append(lr)
    state.seconds = clock.seconds()
    smoothed = clock.smoothed(loss_value, state.step)
    if on_step is not None and run.dist.is_main:
        speed = len(clock.window) / sum(clock.window)
        bad = len(run.bad_samples)
        on_step(StepInfo(state.step, run.settings.steps, loss_value, smoothed, lr, speed, bad))
    state.bad_samples = run.bad_samples.state()
    metrics.update(images_per_second=run.global_batch / clock.window[-1], seconds=state.seconds)


@contextlib.contextmanager
def _checkpoint_on_too_many_bad(run: _Run, saved_step: Callable[[], int]):
    """Past ``max_bad_fraction`` (every process stops at the same batch): write a checkpoint of the last
    finished step unless one was just written (at ``saved_step()``), then exit 2 saying where it is."""
    try:
        yield
    except TooManyBadSamples as exc:
        if run.state.step > saved_step():
            if run.dist.is_main:
                run.save_checkpoint()
            run.dist.barrier()
        written = run.state.step > 0 and latest_checkpoint(run.output) is not None
        raise exc.with_checkpoint(checkpoint_root(run.output)) if written else exc from None


def summary_window(steps: int) -> int:
    """Steps averaged for the reported initial and final loss: 10 % of the run, 1 to 100."""
    return max(1, min(_SUMMARY_WINDOW, steps // 10))


# What the model's history keeps of the facts of a run (beside the reported settings).
_HISTORY_FACTS = ("steps", "global_batch", "world_size", "initial_loss", "final_loss", "seconds")


@dataclass
class FinetuneReport:
    """What a fine-tuning run did: the facts of the run and ``settings``, the reported settings
    (``FinetuneSettings`` fields marked ``report``) as the run resolved them. ``to_json()`` is what
    ``dp finetune --json`` prints (and its table shows); ``initial_loss``/``final_loss`` are means over the
    first/last ``loss_window`` steps."""

    steps: int
    resumed_from: int | None
    world_size: int
    global_batch: int
    device: str
    settings: dict
    initial_loss: float | None
    final_loss: float | None
    loss_window: int
    seconds: float
    steps_per_second: float | None
    bad_samples: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self, output: Path | None = None, preview: bool = False) -> dict:
        """The report as printed, with the files ``save_finetuned`` wrote into ``output``."""
        output = Path(output) if output is not None else None
        facts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return {
            **facts,
            **self.settings,
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


def reported_settings(settings: FinetuneSettings, teacher: LoadedModel | None, dropout: float) -> dict:
    """The settings marked ``report`` as a run used them: the data as text, the teacher's source and the
    distillation weight only with a teacher, the caption dropout the run resolved."""
    resolved = {
        "data": str(settings.data),
        "teacher": teacher.source if teacher is not None else None,
        "distill_weight": settings.distill_weight if teacher is not None else None,
        "caption_dropout": dropout,
    }
    return {name: resolved.get(name, getattr(settings, name)) for name in settings.marked("report")}


def _report(run: _Run, start_step: int, run_seconds: float) -> FinetuneReport:
    losses = run.state.losses
    window = summary_window(len(losses))
    ran = run.state.step - start_step
    return FinetuneReport(
        steps=run.state.step,
        resumed_from=start_step or None,
        world_size=run.dist.world_size,
        global_batch=run.global_batch,
        device=str(run.dist.device),
        settings=reported_settings(run.settings, run.teacher, run.dropout),
        initial_loss=sum(losses[:window]) / window if losses else None,
        final_loss=sum(losses[-window:]) / window if losses else None,
        loss_window=window,
        seconds=run.state.seconds,
        steps_per_second=ran / run_seconds if ran and run_seconds > 0 else None,
        bad_samples=run.bad_samples.to_json(),
    )


def history_entry(report: FinetuneReport) -> dict:
    """The ``history`` record a fine-tuned model folder carries: the reported settings and the facts of
    ``_HISTORY_FACTS``."""
    facts = {key: getattr(report, key) for key in _HISTORY_FACTS}
    entry = {"step": "finetune", **facts, **report.settings}
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
            pixels = preview_samples(ema_view, preview, seed=result.report.settings["seed"])
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
