"""Inputs for timestep-scan tests: a fixed calibration batch for the tiny UNet (``dpcli.testing.make_unet``)."""

from __future__ import annotations

import torch


def calibration(count: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clean samples in [-1, 1] and their noise, 3x16x16, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(count, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(count, 3, 16, 16, generator=generator)
    return x0, noise
