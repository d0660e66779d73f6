"""Model.pipeline(): the matching diffusers pipeline around the (pruned) UNet samples what dp eval samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.latent import (
    kl_autoencoder,
    latent_unet2d,
    vq_autoencoder,
    write_pipeline,
    write_text_pipeline,
)

import dpcli
from dpcli.errors import BadInput
from dpcli.io.weights import load_tensor_file

STEPS, COUNT = 8, 3


def eval_images(dp, model, out) -> np.ndarray:
    """dp eval's images (uint8, N x H x W x C) from its samples file."""
    result = dp("eval", model, "--num-samples", COUNT, "--steps", STEPS, "--no-latency", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    return load_tensor_file(out / "samples.safetensors")["images"].permute(0, 2, 3, 1).numpy()


def pipeline_images(pipe, **options) -> np.ndarray:
    if "prompt" not in options:
        options["batch_size"] = COUNT
    images = pipe(
        generator=dpcli.noise_generators(COUNT), num_inference_steps=STEPS, output_type="np", **options
    ).images
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def assert_within_one_level(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_a_pruned_pixel_unet_in_a_ddim_pipeline_samples_dp_evals_images(dp, tiny_pipeline_folder, tmp_path):
    from diffusers import DDIMPipeline, DDPMPipeline, DPMSolverMultistepScheduler

    pruned = dpcli.prune(dpcli.load(tiny_pipeline_folder), criterion="magnitude", ratio=0.4)
    pruned.save(tmp_path / "pruned")
    pipe = dpcli.load(tmp_path / "pruned").pipeline()
    assert isinstance(pipe, DDIMPipeline)
    assert pipe.unet.conv_in.out_channels < 32  # the pruned UNet, not the original
    assert_within_one_level(pipeline_images(pipe), eval_images(dp, tmp_path / "pruned", tmp_path / "eval"))

    ddpm = dpcli.load(tmp_path / "pruned").pipeline(sampler="ddpm")
    assert isinstance(ddpm, DDPMPipeline) and type(ddpm.scheduler).__name__ == "DDPMScheduler"
    solver = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    swapped = dpcli.load(tmp_path / "pruned").pipeline(scheduler=solver)
    assert swapped.scheduler is solver
    images = pipeline_images(swapped)
    assert images.shape == (COUNT, 16, 16, 3) and images.std() > 0


def test_an_unconditional_latent_unet_gives_an_ldm_pipeline_with_dp_evals_images(dp, tmp_path):
    from diffusers import LDMPipeline

    folder = write_pipeline(tmp_path / "vq-ldm", latent_unet2d(3), vq_autoencoder(), vae_key="vqvae")
    pipe = dpcli.load(folder).pipeline()
    assert isinstance(pipe, LDMPipeline)
    assert_within_one_level(pipeline_images(pipe), eval_images(dp, folder, tmp_path / "eval"))


def test_a_pruned_text_unet_gives_a_stable_diffusion_pipeline_with_dp_evals_images(dp, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # steps_offset 0: StableDiffusionPipeline would rewrite it to 1 for itself; dpcli keeps the model's
    folder = write_text_pipeline(
        tmp_path / "sd",
        tmp_path / "tokenizer-files",
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False),
    )
    pruned = dpcli.prune(dpcli.load(folder), criterion="magnitude", ratio=0.3, head_ratio=0.25)
    pruned.save(tmp_path / "pruned")
    pipe = dpcli.load(tmp_path / "pruned").pipeline()
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.scheduler.config.steps_offset == 0
    expected = eval_images(dp, tmp_path / "pruned", tmp_path / "eval")  # the empty prompt, no guidance
    assert_within_one_level(pipeline_images(pipe, prompt=[""] * COUNT, guidance_scale=1.0), expected)


def test_class_conditional_latent_unets_and_bad_schedulers_are_refused(tmp_path):
    folder = write_pipeline(tmp_path / "class-ldm", latent_unet2d(4, num_class_embeds=3), kl_autoencoder())
    with pytest.raises(BadInput, match="class-conditional latent UNet: diffusers has no pipeline"):
        dpcli.load(folder).pipeline()
    unet = dpcli.load("config:ddpm-digits")
    with pytest.raises(BadInput, match="scheduler must be a diffusers scheduler"):
        unet.pipeline(scheduler="euler")
    with pytest.raises(BadInput, match="sampler must be one of ddim, ddpm"):
        unet.pipeline(sampler="euler")
    assert torch.is_tensor(unet.pipeline(sampler="ddpm").scheduler.betas)
