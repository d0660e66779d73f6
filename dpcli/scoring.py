"""The Diff-Pruning timestep scan: accumulate denoising-loss gradients over timesteps 0..cutoff.

Exactly the reference algorithm (VainF/Diff-Pruning, ddpm_prune.py): one calibration batch x0 and one
noise tensor reused at every timestep; for t = 0, 1, ...: x_t = add_noise(x0, noise, t),
L_t = mse(model(x_t, t), target), backward (gradients accumulate), loss_max = max(loss_max, L_t), stop
after the first t with L_t < threshold × loss_max (that step's gradient is included).

Faster than the reference: ``chunk`` timesteps are packed into one forward/backward. Each timestep's loss
comes out of the same pass, the timesteps after the cutoff are masked out of the backward, so the cutoff
and the accumulated gradient are the same; the work wasted past the cutoff is at most one chunk.

Cheaper than the reference, at a small cost in agreement (benchmarks/scan_budget.py): ``stride`` K scans
only t = 0, K, 2K, ...; the stopping rule sees the strided losses, the cutoff is a real timestep, and the
gradients are multiplied by K (each scanned timestep stands for K) so scores keep the full scan's scale.
Stride 1 is the reference, bit for bit.

On a GPU and across processes (``dist``, torchrun): each process holds its share of the calibration images
(``share_rows``) and the matching rows of the one noise tensor; every timestep's loss is summed over the
processes before the stopping rule sees it, so all stop at the same timestep, and the gradients are summed
once at the end. The sum is the same sum, in another order: equal to one process's to float rounding.
``precision`` bf16/fp16 runs the forward under autocast; the loss and the accumulated gradients stay
float32 (the parameters are float32).

Weights held in bf16/fp16 (``--weights-dtype``) get gradients in that dtype, and a sum of hundreds of them
in bf16's 8-bit significand loses the small ones (benchmarks/bf16_scores.py, digits model, 1000 timesteps
at chunk 1: 8.5 % of the channels pruned at ratio 0.3 differed from float32 weights', 3.2 % with a float32
sum). ``grad_sum_dtype`` "fp32" (the default) sums the scan in float32
instead (``Float32GradientSum``: each parameter's fresh ``.grad`` is added into a float32 buffer as soon
as the backward produces it, and freed), and leaves the sum, cast once to the weights' dtype, in
``.grad``; "weights" sums in ``.grad`` itself (no float32 buffer: 2 bytes less per weight).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dpcli.adapters.base import BatchContext, LoadedModel
from dpcli.errors import BadInput, BadSetting, DpError
from dpcli.runtime import Distributed, autocast


@dataclass
class ScanResult:
    """What the timestep scan did: ``cutoff`` is the last timestep whose gradient was accumulated."""

    cutoff: int
    losses: list[float]
    threshold: float
    timesteps: int
    chunk: int
    calib_size: int
    seconds: float
    forward_passes: int = 0
    samples_computed: int = 0
    stopped_early: bool = field(default=False)
    stride: int = 1
    device: str = "cpu"
    world_size: int = 1  # processes that shared the calibration batch

    @property
    def scanned_timesteps(self) -> list[int]:
        """The timestep of each entry of ``losses``: 0, stride, 2·stride, ..., cutoff."""
        return [index * self.stride for index in range(len(self.losses))]


def calibration_batch(
    loaded: LoadedModel,
    adapter,
    data,
    calib_size: int,
    seed: int,
    prompt: str | None = None,
    workers: int | None = None,
    rows: slice | None = None,
):
    """``calib_size`` examples drawn from ``data`` (a ``DataSpec``, its text, or an open ``Source``) with
    ``seed``, center-cropped and never flipped, prepared by the adapter (e.g. encoded to latents) with
    their captions and class labels. Only the chosen examples are decoded; with ``rows`` (this process's
    ``share_rows``), only those rows of the batch.

    Returns ``(x0, conditioning)``; conditioning is None or a dict of batch-first tensors.
    """
    from dpcli.data import ImageTransform, Source, example_batches, open_source

    source = data if isinstance(data, Source) else open_source(data)
    adapter.check_data(loaded, source, prompt)
    if calib_size > len(source):
        raise BadSetting(
            "calib_size",
            "{calib_size} {size} is larger than the data ({count} images in {data_path})",
            size=calib_size,
            count=len(source),
            data_path=source.spec,
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(source), generator=generator)[:calib_size].tolist()
    if rows is not None:
        chosen = chosen[rows]
    transform = ImageTransform(adapter.data_size(loaded), adapter.data_channels(loaded))
    batches = list(
        example_batches(
            source, transform, chosen, batch_size=calib_size, workers=workers, shared=rows is not None
        )
    )
    batch = batches[0]
    files = [source.path(i) for i in batch.indices] if hasattr(source, "path") else None
    context = BatchContext(
        files=files,
        root=getattr(source, "root", None),
        prompt=prompt,
        captions=batch.captions,
        labels=batch.labels,
        geometry=batch.geometry,
    )
    return adapter.prepare_batch(loaded, batch.pixels, context)


def calibration_noise(
    x0: torch.Tensor, seed: int, rows: slice | None = None, total: int | None = None
) -> torch.Tensor:
    """The noise of the calibration batch, drawn on the CPU (the same on every device). With ``rows``,
    ``x0`` is that share of a batch of ``total`` images: the noise of the whole batch is drawn and those
    rows returned, so a process's share gets the very noise one process would give its images."""
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (total if rows is not None else x0.shape[0], *x0.shape[1:])
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if rows is not None:
        noise = noise[rows]
    return noise.to(x0.device, x0.dtype)


def share_rows(total: int, rank: int, world_size: int) -> slice:
    """The rows of a calibration batch of ``total`` images that process ``rank`` of ``world_size`` works
    on: contiguous blocks whose sizes differ by at most one. Every process needs at least one image."""
    if total < world_size:
        raise BadSetting(
            "calib_size",
            "{calib_size} {size} is smaller than the number of processes ({world}): every process needs "
            "at least one calibration image",
            size=total,
            world=world_size,
        )
    return slice(total * rank // world_size, total * (rank + 1) // world_size)


GRAD_SUM_DTYPES = ("fp32", "weights")


def check_grad_sum_dtype(grad_sum_dtype: str) -> None:
    """``grad_sum_dtype`` is fp32 (sum in float32) or weights (sum in the weights' dtype)."""
    if grad_sum_dtype not in GRAD_SUM_DTYPES:
        raise BadSetting(
            "grad_sum_dtype",
            "{grad_sum_dtype} must be one of " + ", ".join(GRAD_SUM_DTYPES),
            got=repr(grad_sum_dtype),
        )


class Float32GradientSum:
    """The scan's gradient sum in float32 for the parameters held in bf16/fp16, while it runs.

    A post-accumulate-grad hook on each such parameter adds its fresh ``.grad`` (one backward's) into a
    float32 buffer and sets ``.grad`` to None, so no full set of half-precision gradients is ever held
    beside the buffers. ``attach`` returns None when every parameter is float32 (nothing to do)."""

    HALF = (torch.bfloat16, torch.float16)

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.sums: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._add) for p in parameters]

    @classmethod
    def attach(cls, model: torch.nn.Module) -> Float32GradientSum | None:
        half = [p for p in model.parameters() if p.requires_grad and p.dtype in cls.HALF]
        return cls(half) if half else None

    def _add(self, parameter: torch.Tensor) -> None:
        if parameter in self.sums:
            self.sums[parameter].add_(parameter.grad)
        else:
            self.sums[parameter] = parameter.grad.float()
        parameter.grad = None

    def detach(self) -> None:
        """Remove the hooks (the sums stay)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


# fp16 autocast: the scan's backward is scaled by this constant (the gradients are divided by it again),
# so that small activation gradients do not underflow to zero in float16. A constant, not a dynamic
# scaler: a scan cannot skip a timestep that overflowed; an overflow shows as a NaN/inf gradient error.
FP16_LOSS_SCALE = 1024.0


def loss_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the model should predict: noise (epsilon), the velocity (v_prediction) or x0 (sample)."""
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if prediction_type == "sample":
        return x0
    raise BadInput(f"unsupported scheduler prediction_type {prediction_type!r}")


def _repeat(conditioning: dict | None, times: int, rows: slice) -> dict | None:
    if conditioning is None:
        return None
    return {k: v[rows].repeat(times, *([1] * (v.dim() - 1))) for k, v in conditioning.items()}


def _included_count(losses: list[float], loss_max: float, threshold: float) -> int:
    """How many of a chunk's timesteps the reference would have run (the breaking one included)."""
    for index, loss in enumerate(losses):
        loss_max = max(loss_max, loss)
        if loss < loss_max * threshold:
            return index + 1
    return len(losses)


def accumulate_gradients(
    loaded: LoadedModel,
    adapter,
    x0: torch.Tensor,
    noise: torch.Tensor,
    threshold: float,
    timesteps: int | None = None,
    chunk: int = 4,
    batch_size: int = 256,
    conditioning: dict | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    squared: bool = False,
    stride: int = 1,
    gradients: bool = True,
    precision: str = "fp32",
    dist: Distributed | None = None,
    grad_sum_dtype: str = "fp32",
) -> ScanResult:
    """Run the scan on ``loaded.model`` in eval mode, leaving the summed gradients in ``.grad``.

    :param threshold: stop after the first t with L_t < threshold × max(L_0..L_t); 0 scans all timesteps.
    :param timesteps: how many timesteps to scan at most (default: the scheduler's training steps).
    :param chunk: timesteps packed into one forward pass.
    :param batch_size: most samples in one forward pass; a larger calibration batch is split (then one
        timestep per pass, each split backpropagated as it goes: still exact).
    :param on_progress: called with (timestep, loss) for every scanned timestep.
    :param squared: leave Σ_t g_t⊙g_t (per-timestep gradients squared, then summed) in ``.grad`` instead
        of Σ_t g_t; timesteps are then never packed (one timestep per backward).
    :param stride: scan t = 0, stride, 2·stride, ... only; the gradients left are multiplied by ``stride``.
    :param gradients: False for a forward-only scan (no backward, ``.grad`` untouched): the loss curve and
        the cutoff alone, e.g. to estimate what a scan will cost.
    :param precision: fp32, or bf16/fp16 autocast for the forward (gradients stay float32).
    :param dist: the torchrun job (``dpcli.runtime.start_distributed``) whose processes each hold a share
        of the calibration batch in ``x0``/``conditioning`` (see ``share_rows``) and the matching rows of
        ``noise``; losses and gradients are summed over them, and every process ends with the gradients of
        the whole batch. ``calib_size`` and ``samples_computed`` then count the whole job's.
    :param grad_sum_dtype: fp32: sum the timesteps' gradients (or their squares) of bf16/fp16
        weights in float32 and leave the sum cast to the weights' dtype in ``.grad``; weights: sum in
        ``.grad``, in the weights' dtype. The same for float32 weights.
    """
    model = loaded.model
    scheduler = loaded.scheduler
    total = int(timesteps or scheduler.config.num_train_timesteps)
    total = min(total, int(scheduler.config.num_train_timesteps))
    if stride < 1:
        raise BadSetting("timestep_stride", "{timestep_stride} must be at least 1", got=stride)
    schedule = list(range(0, total, stride))
    device = next(model.parameters()).device
    job = dist if dist is not None and dist.enabled else None
    local = x0.shape[0]
    images = int(_reduce(job, torch.tensor([local]), device, "sum")) if job else local
    largest = int(_reduce(job, torch.tensor([local]), device, "max")) if job else local
    micro = min(local, batch_size)
    # Every process makes the same choice (from the largest share), so all pass through the same loop.
    chunk = max(1, min(chunk, batch_size // largest)) if largest <= batch_size and not squared else 1
    elements = x0[0].numel() * images  # mse averages over every element of the calibration batch
    loss_scale = FP16_LOSS_SCALE if precision == "fp16" and gradients else 1.0

    check_grad_sum_dtype(grad_sum_dtype)
    wide = grad_sum_dtype == "fp32"

    # The noisy samples and the targets are computed in float32 whatever the weights' dtype, and the noisy
    # samples cast to the calibration batch's dtype (the weights') only as the model takes them:
    # scheduler.add_noise works in its inputs' dtype, and in bf16 ᾱ_t rounds to 1 at the first timesteps
    # (x_t = x0, no noise at all) and 1 - ᾱ_t to multiples of 2⁻⁸ after them: wrong noise levels exactly
    # where Diff-Pruning looks (benchmarks/bf16_scores.py). A no-op for float32 batches.
    sample_dtype = x0.dtype
    x0, noise = x0.float(), noise.float()

    model.eval()
    if gradients:
        model.zero_grad(set_to_none=True)
    squares: dict[torch.nn.Parameter, torch.Tensor] | None = {} if squared else None
    # squared: .grad holds one timestep (summed over its micro-batches), squared into float32 sums
    accumulator = Float32GradientSum.attach(model) if gradients and wide and not squared else None
    losses: list[float] = []
    loss_max = 0.0
    cutoff = -1
    forward_passes = samples = 0
    stopped = False
    started = time.perf_counter()
    start = 0
    try:
        while start < len(schedule) and not stopped:
            steps = schedule[start : start + chunk]
            chunk_losses = torch.zeros(len(steps), dtype=torch.float64)
            summed = False
            for first in range(0, local, micro):
                rows = slice(first, first + micro)
                clean, eps = x0[rows], noise[rows]
                batch = clean.shape[0]
                t = torch.tensor(steps, device=device).repeat_interleave(batch)
                clean_k = clean.repeat(len(steps), *([1] * (clean.dim() - 1)))
                eps_k = eps.repeat(len(steps), *([1] * (eps.dim() - 1)))
                noisy = scheduler.add_noise(clean_k, eps_k, t)
                target = loss_target(scheduler, clean_k, eps_k, t)
                with torch.set_grad_enabled(gradients):
                    with autocast(device, precision):
                        prediction = adapter.predict(
                            loaded, noisy.to(sample_dtype), t, _repeat(conditioning, len(steps), rows)
                        )
                    errors = (prediction.float() - target.float()).pow(2).flatten(1).sum(1)
                    per_step = errors.view(len(steps), batch).sum(1) / elements
                values = per_step.detach().double()
                if len(steps) > 1:
                    # Several timesteps per pass: this process's share is whole in it, so summed over the
                    # processes these losses are final and the cutoff is known before the backward.
                    values, summed = _reduce(job, values, device, "sum"), True
                if gradients:
                    # with one timestep per pass, that timestep is always included
                    included = _included_count(values.tolist(), loss_max, threshold) if len(steps) > 1 else 1
                    (per_step[:included].sum() * loss_scale).backward()
                chunk_losses += values.cpu()
                forward_passes += 1
                samples += len(steps) * batch
            if not summed:
                chunk_losses = _reduce(job, chunk_losses, device, "sum").cpu()
            if squares is not None:
                _sum_gradients(job, model, _grads(model), 1 / loss_scale)
                _add_squared_gradients(model, squares, wide)
            for step, loss in zip(steps, chunk_losses.tolist(), strict=False):
                if not math.isfinite(loss):
                    raise DpError(f"the loss at timestep {step} is {loss}: the model or data produce NaN/inf")
                losses.append(loss)
                cutoff = step
                if on_progress is not None:
                    on_progress(step, loss)
                loss_max = max(loss_max, loss)
                if loss < loss_max * threshold:
                    stopped = True
                    break
            start += len(steps)
    finally:
        if accumulator is not None:
            accumulator.detach()
    if gradients:
        if squares is not None:
            totals = squares  # summed over the processes and unscaled timestep by timestep
        else:
            totals = accumulator.sums if accumulator is not None else {}
            totals.update(_grads(model))
            _sum_gradients(job, model, totals, 1 / loss_scale)
        if stride > 1:
            _scale_gradients(model, totals, stride)
        _into_grad(model, totals)
        _check_gradients(model, precision)
    if job:
        samples = int(_reduce(job, torch.tensor([samples]), device, "sum"))
    return ScanResult(
        cutoff=cutoff,
        losses=losses,
        threshold=threshold,
        timesteps=total,
        chunk=chunk,
        calib_size=images,
        seconds=time.perf_counter() - started,
        forward_passes=forward_passes,
        samples_computed=samples,
        stopped_early=stopped,
        stride=stride,
        device=str(device),
        world_size=job.world_size if job else 1,
    )


def _scale_gradients(model: torch.nn.Module, totals: dict, factor: float) -> None:
    """Each strided timestep stands for ``factor`` timesteps: Σ_t g_t ≈ factor × the strided sum (and
    Σ_t g_t⊙g_t ≈ factor × the strided sum of squares), so scores keep the scale of a full scan."""
    for parameter in model.parameters():
        if parameter in totals:
            totals[parameter].mul_(factor)


def _grads(model: torch.nn.Module) -> dict:
    """Each parameter's ``.grad`` (those that have one)."""
    return {p: p.grad for p in model.parameters() if p.grad is not None}


def _into_grad(model: torch.nn.Module, totals: dict) -> None:
    """Leave each parameter's sum in ``.grad``, cast to its dtype (a float32 sum of bf16 weights is
    rounded once, here); one parameter at a time, so a float32 sum is freed as its cast is made."""
    for parameter in model.parameters():
        total = totals.pop(parameter, None)
        parameter.grad = None if total is None else total.to(parameter.dtype)


def _reduce(job: Distributed | None, values: torch.Tensor, device: torch.device, op: str) -> torch.Tensor:
    """``values`` summed (``op`` "sum") or maximised ("max") over the processes of ``job``; as they are
    without one. The collective runs on ``device`` (NCCL needs GPU tensors)."""
    if job is None:
        return values
    shared = values.to(device)
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(shared, op=reduce_op)
    return shared


def _sum_gradients(job: Distributed | None, model: torch.nn.Module, totals: dict, factor: float) -> None:
    """Sum each parameter's gradient in ``totals`` over the processes of ``job`` (each holds its share's
    gradient), then × ``factor``. In the order of ``model.parameters()``, the same on every process."""
    for parameter in model.parameters():
        total = totals.get(parameter)
        if total is not None:
            if job is not None:
                torch.distributed.all_reduce(total)
            if factor != 1:
                total.mul_(factor)


def _check_gradients(model: torch.nn.Module, precision: str = "fp32") -> None:
    for name, parameter in model.named_parameters():
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            hint = " (a float16 overflow: use bf16 or fp32 precision)" if precision == "fp16" else ""
            raise DpError(f"gradient of {name} contains NaN/inf: scores would be garbage{hint}")


def _add_squared_gradients(model: torch.nn.Module, squares: dict, wide: bool = False) -> None:
    """Add this timestep's squared gradients to ``squares`` (in float32 with ``wide``) and clear ``.grad``
    for the next timestep."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            grad = parameter.grad.detach()
            square = (grad.float() if wide else grad).pow(2)
            if parameter in squares:
                squares[parameter] += square
            else:
                squares[parameter] = square
            parameter.grad = None


def place(loaded: LoadedModel, device: torch.device) -> None:
    """Move the denoiser and every module it comes with (autoencoder, text encoder, class embedder) to
    ``device``, so the calibration batch is encoded there too."""
    loaded.model.to(device)
    for component in loaded.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device)


@contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool):
    """Recompute activations in the backward instead of keeping them (diffusers models'
    ``enable_gradient_checkpointing``), switched off again on leaving: torch-pruning cannot see through
    the checkpoint wrappers when it builds its dependency graph."""
    if not enabled:
        yield
        return
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise BadSetting(
            "gradient_checkpointing",
            "{gradient_checkpointing}: the model ({kind}) does not support gradient checkpointing",
            kind=type(model).__name__,
        )
    model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        model.disable_gradient_checkpointing()


# Packing timesteps stops paying at about this many samples per forward, per device type.
# cpu: measured; on 2 idle cores the digits scan was fastest at 64 and slower at 128 and 256
#   (benchmarks/pruning.md, "default --chunk").
# cuda: NOT measured (no GPU was available where this was written; benchmarks/gpu.py --quick measures
#   packed against unpacked on one). 256 is reasoning, not a measurement: a GPU needs hundreds of samples
#   in flight to be busy (the reference scans 128 images per timestep on one GPU, so 256 is two of its
#   timesteps per pass), and --batch-size (default 256) still caps a pass, which bounds its memory.
# Anything else (mps) takes the CPU's figure.
SAMPLES_PER_PASS = {"cpu": 64, "cuda": 256}


def default_chunk(calib_size: int, batch_size: int, device_type: str = "cpu") -> int:
    """Timesteps per forward: about ``SAMPLES_PER_PASS[device_type]`` samples (``calib_size`` being the
    images one device holds), never more than ``batch_size``."""
    samples = SAMPLES_PER_PASS.get(device_type, SAMPLES_PER_PASS["cpu"])
    return max(1, min(batch_size, samples) // max(1, calib_size))


def share_chunk(chunk: int | None, batch_size: int, images: int, dist: Distributed) -> int:
    """``chunk``, or the default for the largest share of ``images`` calibration images one device holds."""
    share = -(-images // dist.world_size)
    return chunk or default_chunk(share, batch_size, dist.device.type)


def calibration_share(
    loaded: LoadedModel, adapter, settings, size: int, dist: Distributed, fit: bool = False
):
    """This process's share of the calibration batch of ``size`` images from ``settings`` (a
    ``dpcli.jobs.score.ScoreSettings``: its data, seed, prompt and workers) (all of it in a single process)
    and of its noise; with ``fit``, as many images as the data has if it has fewer.

    Returns ``(x0, noise, conditioning, available)``: ``available`` is the data's image count when it was
    smaller than ``size`` (else None)."""
    from dpcli.data import open_source

    source = open_source(settings.data)
    available = len(source) if fit and len(source) < size else None
    total = available or size
    rows = share_rows(total, dist.rank, dist.world_size) if dist.enabled else None
    x0, conditioning = calibration_batch(
        loaded,
        adapter,
        source,
        total,
        settings.seed,
        prompt=settings.prompt,
        workers=settings.workers,
        rows=rows,
    )
    return x0, calibration_noise(x0, settings.seed, rows, total), conditioning, available


def scan_calibration(
    loaded: LoadedModel,
    adapter,
    settings,
    size: int,
    threshold: float,
    dist: Distributed,
    *,
    chunk: int | None = None,
    fit: bool = False,
    **options,
) -> tuple[ScanResult, int | None]:
    """The timestep scan (``accumulate_gradients``, with ``options`` such as ``stride``) on this process's
    share of ``size`` calibration images (``calibration_share``, with ``fit``), at the timesteps, batch size
    and precision of ``settings`` (a ``dpcli.jobs.score.ScoreSettings``); ``chunk`` None: the default for
    the images one device holds. Returns the scan and the data's image count when it had fewer than
    ``size`` (else None)."""
    x0, noise, conditioning, available = calibration_share(loaded, adapter, settings, size, dist, fit=fit)
    scan = accumulate_gradients(
        loaded,
        adapter,
        x0,
        noise,
        threshold,
        timesteps=settings.timesteps,
        chunk=share_chunk(chunk, settings.batch_size, available or size, dist),
        batch_size=settings.batch_size,
        conditioning=conditioning,
        precision=settings.precision,
        dist=dist,
        grad_sum_dtype=settings.grad_sum_dtype,
        **options,
    )
    return scan, available
