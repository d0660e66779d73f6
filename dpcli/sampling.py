"""Sampling through the adapter hooks: DDIM (eta 0) and DDPM, uniform or quad timestep spacing.

Schedules come from diffusers: the DDIM/DDPM scheduler is built ``from_config`` of the model's own
scheduler config (betas, prediction type, clipping). Two things plain diffusers lacks:

- the paper's CIFAR-10 "quad" spacing, ``t_i = int(linspace(0, sqrt(0.8 T), n)_i ** 2)``. diffusers'
  ``DDIMScheduler.step`` assumes an even stride (``prev = t - T // n``), which is wrong for any other
  sequence, so the DDIM update here takes the previous timestep from the sequence itself (same formula
  and operation order as diffusers, so uniform spacing gives what ``DDIMPipeline`` gives). The formula
  repeats small timesteps (0, 0, 0, 0, 1, 2, 2, ...); a DDIM step from t to the same t is the identity,
  so repeats are dropped: ``--steps 100 --spacing quad`` visits 96 distinct timesteps for T = 1000.
- determinism per sample index: image ``i`` has its own random streams seeded from ``(seed, i)`` (its
  initial noise, its conditioning, and for DDPM its per-step noise), whatever the batch size or process.

Work is split into batches of consecutive indices; under torchrun each rank takes every world-size-th
batch and rank 0 gathers, so a distributed run computes exactly the batches a single process computes.
Images are bitwise identical to a single process with the same ``--batch-size`` and thread count; with
another batch size they start from identical noise and agree up to float rounding (convolution kernels
sum in a batch-size dependent order, ~1e-6).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dpcli import runtime
from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput, BadSetting
from dpcli.runtime import resolve_device, resolve_precision, synchronize

SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("uniform", "quad")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Independent random streams of one sample index.
_NOISE, _CONDITIONING, _STEPS = 0, 1, 2


@dataclass
class SamplerSettings:
    """How images are sampled (recorded in reports; two runs with equal settings are comparable)."""

    sampler: str = "ddim"
    steps: int = 100
    spacing: str = "uniform"
    seed: int = 0
    batch_size: int = 64
    precision: str = "auto"
    guidance_scale: float = 1.0
    # Conditioning by sample index: sample i gets prompts[i % P] and class_labels[i % L] (see dpcli.conditions).
    prompts: list[str] | None = None
    negative_prompt: str | None = None
    class_labels: list[int] | None = None  # None for a class-conditional model: every class in turn
    options: dict = field(default_factory=dict)  # further adapter options for sampling_conditioning

    def conditions_digest(self) -> str | None:
        """A digest of the per-index conditioning (None when there is none): equal digests, equal inputs."""
        if self.prompts is None and self.negative_prompt is None and self.class_labels is None:
            return None
        from dpcli.conditions import sha256_of_json

        return sha256_of_json(
            {
                "prompts": self.prompts,
                "negative_prompt": self.negative_prompt,
                "class_labels": self.class_labels,
            }
        )

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise BadSetting(
                "sampler", "{sampler} must be one of " + ", ".join(SAMPLERS), got=repr(self.sampler)
            )
        if self.spacing not in SPACINGS:
            raise BadSetting(
                "spacing", "{spacing} must be one of " + ", ".join(SPACINGS), got=repr(self.spacing)
            )
        if self.precision not in PRECISIONS:
            raise BadSetting(
                "precision", "{precision} must be one of " + ", ".join(PRECISIONS), got=repr(self.precision)
            )
        if self.steps < 1:
            raise BadSetting("steps", "{steps} must be at least 1", got=self.steps)
        if self.batch_size < 1:
            raise BadSetting("batch_size", "{batch_size} must be at least 1", got=self.batch_size)
        if self.seed < 0:
            raise BadSetting("seed", "{seed} must be >= 0 for sampling", got=self.seed)


def quad_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The paper's CIFAR-10 spacing, exactly as the DDIM code base computes it (ascending, repeats kept)."""
    values = np.linspace(0, np.sqrt(0.8 * num_train_timesteps), steps) ** 2
    return [int(value) for value in values]


def _quiet_diffusers():
    """diffusers logs every config key a scheduler class does not use; that is not the user's concern."""
    from diffusers.utils import logging as diffusers_logging

    return _LogLevel(diffusers_logging.get_logger("diffusers"), logging.ERROR)


class _LogLevel(contextlib.AbstractContextManager):
    def __init__(self, logger: logging.Logger, level: int):
        self.logger, self.level, self.previous = logger, level, logger.level

    def __enter__(self):
        self.logger.setLevel(self.level)

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.previous)


def build_scheduler(scheduler_config, sampler: str):
    """A fresh diffusers DDIM or DDPM scheduler from the model's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    with _quiet_diffusers():
        if sampler == "ddim":
            return DDIMScheduler.from_config(scheduler_config)
        return DDPMScheduler.from_config(scheduler_config)


def timestep_sequence(scheduler_config, steps: int, spacing: str) -> list[int]:
    """The distinct timesteps a sampler visits, descending.

    ``uniform`` is what diffusers' DDIM scheduler chooses for ``steps`` under the model's
    ``timestep_spacing`` config (``leading`` by default: 990, 980, ..., 0 for T=1000, n=100, the paper's
    ``range(0, 1000, 10)``); ``quad`` is :func:`quad_timesteps` without repeats.
    """
    total = int(scheduler_config["num_train_timesteps"])
    if not 1 <= steps <= total:
        raise BadSetting(
            "steps", f"{{steps}} must be in [1, {total}] (the model's training timesteps)", got=steps
        )
    if spacing == "quad":
        values = quad_timesteps(total, steps)
    elif spacing == "uniform":
        probe = build_scheduler(scheduler_config, "ddim")
        probe.set_timesteps(steps)
        values = [int(t) for t in probe.timesteps]
    else:
        raise BadSetting("spacing", "{spacing} must be one of " + ", ".join(SPACINGS), got=repr(spacing))
    return sorted(set(values), reverse=True)


def sample_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """The CPU generator of one random stream of sample ``index`` (independent of batch and process)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def initial_noise(shape: Sequence[int], seed: int, indices: Sequence[int]) -> torch.Tensor:
    """The starting noise of each sample index, stacked: ``[len(indices), *shape]`` float32 on the CPU."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=sample_generator(seed, i, _NOISE)) for i in indices]
    )


class Sampler:
    """Runs the denoising loop for ``loaded`` through its adapter (``noise_shape``,
    ``sampling_conditioning``, ``denoise``, ``decode``), under ``torch.inference_mode()``.

    Moves the model to ``device``; on GPU also to channels_last memory format, with autocast in the
    chosen precision (the scheduler arithmetic stays float32).
    """

    def __init__(
        self, loaded: LoadedModel, settings: SamplerSettings, device: str | torch.device | None = None
    ):
        settings.validate()
        if loaded.scheduler is None:
            raise BadInput(f"{loaded.source} has no noise scheduler to sample with")
        self.loaded = loaded
        self.settings = settings
        self.adapter = loaded.adapter
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.autocast_dtype = resolve_precision(settings.precision, self.device)
        self.channels_last = self.device.type == "cuda"
        config = dict(loaded.scheduler.config)
        self.timesteps = timestep_sequence(config, settings.steps, settings.spacing)
        self.scheduler = build_scheduler(config, settings.sampler)
        if settings.sampler == "ddpm":
            self.scheduler.set_timesteps(timesteps=self.timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod
        self.final_alpha_cumprod = getattr(self.scheduler, "final_alpha_cumprod", None)
        loaded.model.to(self.device).eval()
        if self.channels_last:
            loaded.model.to(memory_format=torch.channels_last)
        self.noise_shape = tuple(self.adapter.noise_shape(loaded))
        self.conditioning_spec = self.adapter.conditioning_spec(loaded)

    @property
    def precision_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def previous_timestep(self, position: int) -> int:
        """The timestep after ``self.timesteps[position]`` in the sequence (-1 after the last)."""
        return self.timesteps[position + 1] if position + 1 < len(self.timesteps) else -1

    def conditioning(self, indices: Sequence[int]):
        """The adapter's conditioning for ``indices``: prompt ``i mod P``, class label ``i mod L`` (every class
        in turn when no labels were given), the same whatever the batch or process."""
        settings = self.settings
        options = dict(settings.options)
        if settings.prompts:
            options["prompt"] = [settings.prompts[i % len(settings.prompts)] for i in indices]
        if settings.negative_prompt is not None:
            options["negative_prompt"] = settings.negative_prompt
        labels = settings.class_labels
        if not labels and self.conditioning_spec.kind == "class":
            labels = list(range(int(self.conditioning_spec.num_classes)))
        if labels:
            options["class_labels"] = [int(labels[i % len(labels)]) for i in indices]
        generators = [sample_generator(settings.seed, i, _CONDITIONING) for i in indices]
        return self.adapter.sampling_conditioning(self.loaded, len(indices), generators, **options)

    def predict(self, sample: torch.Tensor, timestep: int, conditioning) -> torch.Tensor:
        """The adapter's prediction (noise, v or x0) for the batch at ``timestep``, as float32."""
        timesteps = torch.full((sample.shape[0],), timestep, device=self.device, dtype=torch.long)
        model_input = sample.contiguous(memory_format=torch.channels_last) if self.channels_last else sample
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            output = self.adapter.denoise(
                self.loaded, model_input, timesteps, conditioning, self.settings.guidance_scale
            )
        return output.float()

    def step(self, sample: torch.Tensor, position: int, conditioning, step_generators=None) -> torch.Tensor:
        """One denoising step from ``self.timesteps[position]``: the model, then the scheduler update."""
        timestep = self.timesteps[position]
        output = self.predict(sample, timestep, conditioning)
        if self.settings.sampler == "ddpm":
            return self.scheduler.step(output, timestep, sample, generator=step_generators).prev_sample
        return self.ddim_update(output, timestep, self.previous_timestep(position), sample)

    def ddim_update(self, output: torch.Tensor, timestep: int, previous: int, sample: torch.Tensor):
        """diffusers' ``DDIMScheduler.step`` at eta 0 (same formula and order), with ``previous`` given
        instead of assumed to be ``timestep - T // n``."""
        config = self.scheduler.config
        if output.shape[1] == 2 * sample.shape[1]:  # learned variance: DDIM uses the mean prediction only
            output = output[:, : sample.shape[1]]
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if config.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * output) / alpha_prod_t ** (0.5)
            pred_epsilon = output
        elif config.prediction_type == "sample":
            pred_original_sample = output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        elif config.prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * output
            pred_epsilon = (alpha_prod_t**0.5) * output + (beta_prod_t**0.5) * sample
        else:
            raise BadInput(f"unsupported scheduler prediction_type {config.prediction_type!r}")
        if config.thresholding:
            pred_original_sample = self.scheduler._threshold_sample(pred_original_sample)
        elif config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -config.clip_sample_range, config.clip_sample_range
            )
        pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
        return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    def sample(self, indices: Sequence[int], on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Images of ``indices`` (one batch) in [0, 1], float32 on the CPU."""
        indices = list(indices)
        seed = self.settings.seed
        with torch.inference_mode():
            sample = initial_noise(self.noise_shape, seed, indices).to(self.device)
            conditioning = self.conditioning(indices)
            step_generators = None
            if self.settings.sampler == "ddpm":
                step_generators = [sample_generator(seed, i, _STEPS) for i in indices]
            for position in range(len(self.timesteps)):
                sample = self.step(sample, position, conditioning, step_generators)
                if on_step is not None:
                    on_step()
            images = self.adapter.decode(self.loaded, sample).float()
            return (images / 2 + 0.5).clamp(0, 1).cpu()

    def step_timer(self, batch_size: int):
        """A function that runs one denoising step (model + scheduler update) at ``batch_size`` from a
        mid-sequence timestep, on the same inputs each call, and returns its wall time in seconds."""
        indices = list(range(batch_size))
        position = len(self.timesteps) // 2
        with torch.inference_mode():
            sample = initial_noise(self.noise_shape, self.settings.seed, indices).to(self.device)
            conditioning = self.conditioning(indices)
        generators = None
        if self.settings.sampler == "ddpm":
            generators = [sample_generator(self.settings.seed, i, _STEPS) for i in indices]

        def run() -> float:
            with torch.inference_mode():
                synchronize(self.device)
                started = time.perf_counter()
                self.step(sample, position, conditioning, generators)
                synchronize(self.device)
                return time.perf_counter() - started

        return run


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as a PNG would store them (rounded to 8 bits)."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Samples:
    """Generated images (uint8, as a PNG stores them) in index order, and how they were made."""

    images: torch.Tensor  # [N, C, H, W] uint8
    indices: list[int]
    settings: SamplerSettings
    timesteps: list[int]
    seconds: float
    device: str
    precision: str
    world_size: int

    @property
    def images_per_second(self) -> float:
        return len(self.indices) / self.seconds if self.seconds > 0 else math.inf

    def describe(self) -> dict:
        """The JSON-ready record of how these samples were made."""
        return {
            "sampler": self.settings.sampler,
            "steps": self.settings.steps,
            "spacing": self.settings.spacing,
            "timesteps": list(self.timesteps),
            "model_evaluations": len(self.timesteps),
            "seed": self.settings.seed,
            "guidance_scale": self.settings.guidance_scale,
            "conditions_sha256": self.settings.conditions_digest(),
            "num_samples": len(self.indices),
            "batch_size": self.settings.batch_size,
            "device": self.device,
            "precision": self.precision,
            "world_size": self.world_size,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
        }


def generate(sampler: Sampler, num_samples: int, on_step: Callable[[], None] | None = None) -> Samples | None:
    """Images 0..num_samples-1. Under torchrun, rank r samples batches r, r + world, ... and rank 0
    gathers; rank 0 gets the Samples, the other ranks None. ``on_step`` is called after every denoising
    step of this rank's batches (``steps_for_rank`` of them)."""
    rank, world = runtime.world()
    size = sampler.settings.batch_size
    batches = [list(range(s, min(s + size, num_samples))) for s in range(0, num_samples, size)]
    started = time.perf_counter()
    mine = {b: to_uint8(sampler.sample(batches[b], on_step)) for b in range(rank, len(batches), world)}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank != 0:
            return None
        for part in gathered:
            mine.update(part)
    images = torch.cat([mine[b] for b in range(len(batches))]) if batches else torch.empty(0)
    return Samples(
        images=images,
        indices=list(range(num_samples)),
        settings=sampler.settings,
        timesteps=list(sampler.timesteps),
        seconds=time.perf_counter() - started,
        device=str(sampler.device),
        precision=sampler.precision_name,
        world_size=world,
    )


def steps_for_rank(sampler: Sampler, num_samples: int) -> int:
    """How many denoising steps this rank runs in :func:`generate` (for progress bars)."""
    rank, world = runtime.world()
    batches = math.ceil(num_samples / sampler.settings.batch_size)
    return len(range(rank, batches, world)) * len(sampler.timesteps)
