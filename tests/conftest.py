"""Shared fixtures: tiny UNets built from real diffusers configs, tiny image folders, an in-process dp."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpcli.testing import TINY_UNET_CONFIG as TINY_CONFIG
from dpcli.testing import Result, invoke, make_image_folder, make_unet, run_dp_subprocess

__all__ = ["TINY_CONFIG", "Result", "make_image_folder", "make_unet", "run_dp_subprocess"]


@pytest.fixture(autouse=True)
def builtins_only():
    """dp's own tests see the built-in plugins only, whatever else is installed (``make test`` installs
    the example plugins); tests of the plugin machinery load their own registries."""
    from dpcli import plugins

    plugins.set_registry(plugins.load_registry(third_party=False))
    yield
    plugins.set_registry(None)


@pytest.fixture
def dp():
    """Run ``dp ARGS...`` in-process through the real entry point (error handling and exit codes included)."""
    return invoke


@pytest.fixture
def tiny_unet():
    return make_unet()


@pytest.fixture
def tiny_unet_folder(tmp_path, tiny_unet) -> Path:
    folder = tmp_path / "tiny-unet"
    tiny_unet.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_pipeline_folder(tmp_path, tiny_unet) -> Path:
    from diffusers import DDIMScheduler, DDPMPipeline

    folder = tmp_path / "tiny-pipeline"
    DDPMPipeline(unet=tiny_unet, scheduler=DDIMScheduler(num_train_timesteps=500)).save_pretrained(folder)
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_loaded(seed: int = 0, config: dict | None = None):
    """A tiny UNet2DModel wrapped as a LoadedModel with diffusers' default DDPMScheduler."""
    from diffusers import DDPMScheduler

    from dpcli.adapters.base import LoadedModel
    from dpcli.plugins import get_registry

    model = make_unet(config, seed=seed)
    config = dict(model.config)
    return LoadedModel(
        model=model,
        adapter_name="ddpm",
        source="tiny",
        source_kind="test",
        config=config,
        sample_size=config["sample_size"],
        in_channels=config["in_channels"],
        scheduler=DDPMScheduler(),
        adapter=get_registry().adapter("ddpm"),
    )
