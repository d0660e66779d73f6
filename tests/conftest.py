"""Shared fixtures: tiny UNets built from real diffusers configs, tiny image folders, an in-process dp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Attention at the second level, 8 norm groups: as cheap as a real UNet2DModel gets.
TINY_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
}


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def dp(capsys):
    """Run ``dp ARGS...`` in-process through the real entry point (error handling and exit codes included)."""
    from dpcli.cli.app import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_dp_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None) -> Result:
    """Run dp in a fresh interpreter (for environment-dependent behaviour such as HF_HUB_OFFLINE)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "dpcli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def make_unet(config: dict | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel.from_config(config or TINY_CONFIG).eval()


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


def make_image_folder(folder: Path, count: int = 8, size: int = 20, seed: int = 0) -> Path:
    """A folder of small random RGB PNGs in two sub-folders (exercises recursion)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        sub = folder / f"class{index % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{index:03d}.png")
    return folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")
