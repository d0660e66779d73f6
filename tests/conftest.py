"""Shared fixtures (fixtures only): tiny UNets built from real diffusers configs, tiny image folders, an in-process
dp. Helper functions live in ``dpcli.testing`` (also for plugin authors) and ``tests/helpers``."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpcli.testing import invoke, make_image_folder, make_unet


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
def pruned_folder(tmp_path, tiny_unet_folder) -> Path:
    """``tiny_unet_folder`` pruned by half (magnitude), through the CLI."""
    out = tmp_path / "pruned"
    result = invoke("prune", tiny_unet_folder, "--criterion", "magnitude", "--ratio", "0.5", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")
