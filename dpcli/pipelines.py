"""diffusers pipelines around a loaded (pruned) model: ``Model.pipeline()``.

The pipeline holds the model's own modules (no copy): the pruned UNet, its autoencoder, text encoder and
tokenizer. By default its scheduler is the one ``dp eval`` samples with: DDIM (or DDPM with
``sampler="ddpm"``) built from the model's scheduler config. With the same starting noise
(``dpcli.noise_generators``), steps and scheduler, its images are ``dp eval``'s (tested within one 8-bit
level). Any diffusers scheduler can be given instead (``scheduler=``), or swapped in later as usual:
``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``.

Which pipeline:

- pixel UNets (the ``ddpm`` adapter): ``DDIMPipeline`` for a DDIM scheduler, else ``DDPMPipeline`` (which
  steps any scheduler that needs no input scaling: DDPM, DPM-Solver, UniPC, ...);
- unconditional latent UNets: ``LDMPipeline`` (its ``vqvae`` is the model's autoencoder, VQ or KL);
- text-conditional latent UNets: ``StableDiffusionPipeline`` without a safety checker;
  ``StableDiffusionXLPipeline`` for SDXL (two text encoders, added text_time conditioning).

Class-conditional latent UNets have no diffusers pipeline (diffusers has none for class-conditional UNet
LDMs): they are refused with a BadInput, as are models of adapters other than ``ddpm`` and ``ldm``.
"""

from __future__ import annotations

from dpcli.adapters.base import LoadedModel
from dpcli.errors import BadInput, BadSetting

SAMPLERS = ("ddim", "ddpm")


def default_scheduler(loaded: LoadedModel, sampler: str):
    """The scheduler ``dp eval --sampler SAMPLER`` samples with, built from the model's scheduler config."""
    from dpcli.sampling import build_scheduler

    if sampler not in SAMPLERS:
        raise BadSetting("sampler", "{sampler} must be one of " + ", ".join(SAMPLERS), got=repr(sampler))
    if loaded.scheduler is None:
        raise BadInput(f"{loaded.source} has no noise scheduler to build a pipeline with")
    return build_scheduler(dict(loaded.scheduler.config), sampler)


def build_pipeline(loaded: LoadedModel, sampler: str = "ddim", scheduler=None):
    """The diffusers pipeline of ``loaded`` (see the module docstring), on the model's device."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if scheduler is None:
        scheduler = default_scheduler(loaded, sampler)
    elif not isinstance(scheduler, SchedulerMixin):
        raise BadSetting(
            "scheduler", "{scheduler} must be a diffusers scheduler", got=type(scheduler).__name__
        )
    if loaded.adapter == "ddpm":
        return _pixel_pipeline(loaded, scheduler)
    if loaded.adapter == "ldm":
        return _latent_pipeline(loaded, scheduler)
    raise BadInput(
        f"no diffusers pipeline for models of the {loaded.adapter!r} adapter; sample them with dp eval"
    )


def _pixel_pipeline(loaded: LoadedModel, scheduler):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    if isinstance(scheduler, DDIMScheduler):
        return DDIMPipeline(unet=loaded.model, scheduler=scheduler)
    return DDPMPipeline(unet=loaded.model, scheduler=scheduler)


def _latent_pipeline(loaded: LoadedModel, scheduler):
    from diffusers import LDMPipeline, StableDiffusionPipeline

    kind = loaded.extras.get("conditioning")
    vae = loaded.components.get("vae")
    if vae is None:
        raise BadInput(f"{loaded.source} has no autoencoder: a pipeline needs one to decode latents")
    if kind == "text" and loaded.extras.get("added_conditioning"):
        from dpcli.adapters.latent.sdxl import sdxl_pipeline

        return sdxl_pipeline(loaded, scheduler)
    if kind == "text":
        tokenizer = loaded.components.get("tokenizer")
        if tokenizer is None:
            raise BadInput(f"{loaded.source} has no tokenizer: StableDiffusionPipeline needs one")
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=loaded.components["text_encoder"],
            tokenizer=tokenizer,
            unet=loaded.model,
            scheduler=scheduler.__class__.from_config(scheduler.config),  # a copy: see below
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        # StableDiffusionPipeline rewrites old scheduler configs (steps_offset, clip_sample) in place; the
        # pipeline samples with the scheduler it was given, unchanged, as dp eval does.
        pipeline.scheduler = scheduler
        return pipeline
    if kind == "none":
        return LDMPipeline(vqvae=vae, unet=loaded.model, scheduler=scheduler)
    if kind in ("class", "class-context"):
        raise BadInput(
            f"{loaded.source} is a class-conditional latent UNet: diffusers has no pipeline for it; "
            "sample it with dp eval (class labels) or dpcli.evaluate"
        )
    raise BadInput(f"{loaded.source} has no text encoder or class embedder for its cross-attention")
