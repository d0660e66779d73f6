"""Sampling: the quad spacing is the paper's, DDIM matches diffusers and a hand-written DDIM, and image i
depends only on the seed and i."""

import numpy as np
import pytest
import torch

from dpcli.errors import BadInput
from dpcli.loading import load_model
from dpcli.sampling import (
    Sampler,
    SamplerSettings,
    generate,
    initial_noise,
    quad_timesteps,
    sample_generator,
    timestep_sequence,
)

T1000 = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def test_quad_spacing_is_the_papers_formula():
    expected = [int(v) for v in np.linspace(0, np.sqrt(0.8 * 1000), 100) ** 2]
    assert quad_timesteps(1000, 100) == expected
    assert expected[:8] == [0, 0, 0, 0, 1, 2, 2, 3] and expected[-1] == 800
    sequence = timestep_sequence(T1000, 100, "quad")
    assert sequence == sorted(set(expected), reverse=True)
    assert sequence[0] == 800 and sequence[-1] == 0 and len(sequence) == 96


def test_uniform_spacing_is_the_papers_range():
    assert timestep_sequence(T1000, 100, "uniform") == list(range(990, -1, -10))
    assert timestep_sequence(T1000, 4, "uniform") == [750, 500, 250, 0]


@pytest.mark.parametrize("steps, spacing", [(0, "uniform"), (1001, "uniform"), (10, "cubic")])
def test_bad_schedules_are_bad_input(steps, spacing):
    with pytest.raises(BadInput):
        timestep_sequence(T1000, steps, spacing)


def test_uniform_ddim_matches_diffusers_ddim_pipeline(tiny_unet_folder):
    from diffusers import DDIMPipeline

    loaded = load_model(str(tiny_unet_folder))
    settings = SamplerSettings(steps=4, seed=3, batch_size=3)
    ours = Sampler(loaded, settings).sample([0, 1, 2])
    pipeline = DDIMPipeline(unet=loaded.model, scheduler=loaded.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    generators = [sample_generator(3, i, 0) for i in range(3)]
    theirs = pipeline(batch_size=3, generator=generators, num_inference_steps=4, eta=0.0, output_type="np")
    expected = torch.from_numpy(theirs.images).permute(0, 3, 1, 2)
    assert torch.allclose(ours, expected, atol=1e-5)


def hand_written_ddim(model, betas: torch.Tensor, sequence: list[int], x: torch.Tensor) -> torch.Tensor:
    """generalized_steps (eta 0) of the DDIM code base the paper used, repeats in the sequence included."""
    alphas = (1 - torch.cat([torch.zeros(1), betas])).cumprod(0)  # alpha(t) = alphas[t + 1]
    previous = [-1] + sequence[:-1]
    with torch.no_grad():
        for t, t_next in zip(reversed(sequence), reversed(previous), strict=True):
            a_t, a_next = alphas[t + 1], alphas[t_next + 1]
            eps = model(x, torch.full((x.shape[0],), t)).sample
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return (x / 2 + 0.5).clamp(0, 1)


def test_quad_ddim_matches_a_hand_check(tiny_unet_folder):
    from diffusers import DDPMScheduler

    loaded = load_model(str(tiny_unet_folder))
    loaded.scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)  # the paper's code: no clip
    settings = SamplerSettings(steps=12, spacing="quad", seed=0, batch_size=2)
    sampler = Sampler(loaded, settings)
    assert sampler.timesteps == sorted(set(quad_timesteps(1000, 12)), reverse=True)
    ours = sampler.sample([0, 1])
    noise = initial_noise((3, 16, 16), 0, [0, 1])
    expected = hand_written_ddim(loaded.model, loaded.scheduler.betas, quad_timesteps(1000, 12), noise)
    assert torch.allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize("sampler_name", ["ddim", "ddpm"])
def test_same_seed_gives_the_same_images_whatever_the_batch_size(tiny_unet_folder, sampler_name):
    loaded = load_model(str(tiny_unet_folder))
    images = {}
    for batch_size in (1, 2, 5):
        settings = SamplerSettings(sampler=sampler_name, steps=3, seed=7, batch_size=batch_size)
        images[batch_size] = generate(Sampler(loaded, settings), 5).images
    # Same noise per index; convolution sums differ only in float rounding between batch sizes.
    for batch_size in (2, 5):
        assert (images[batch_size].int() - images[1].int()).abs().max() <= 1
    other_seed = generate(Sampler(loaded, SamplerSettings(sampler=sampler_name, steps=3, seed=8)), 5).images
    assert not torch.equal(other_seed, images[5])


def test_noise_of_an_index_does_not_depend_on_its_neighbours():
    together = initial_noise((3, 4, 4), 5, [0, 1, 2, 3])
    assert torch.equal(initial_noise((3, 4, 4), 5, [2]), together[2:3])
    assert torch.equal(initial_noise((3, 4, 4), 5, [3, 1]), together[[3, 1]])
    assert not torch.equal(initial_noise((3, 4, 4), 6, [0]), together[:1])


def test_sampling_is_repeatable_bit_for_bit(tiny_unet_folder):
    loaded = load_model(str(tiny_unet_folder))
    settings = SamplerSettings(sampler="ddpm", steps=3, seed=1, batch_size=2)
    first = generate(Sampler(loaded, settings), 3).images
    assert torch.equal(first, generate(Sampler(loaded, settings), 3).images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_autocast_and_channels_last_stay_close_to_fp32(tiny_unet_folder):
    loaded = load_model(str(tiny_unet_folder))
    reference = Sampler(loaded, SamplerSettings(steps=4, precision="fp32"), device="cpu").sample([0, 1])
    sampler = Sampler(loaded, SamplerSettings(steps=4), device="cuda")
    assert sampler.precision_name in ("bf16", "fp16") and sampler.channels_last
    assert (sampler.sample([0, 1]) - reference).abs().mean() < 0.05
