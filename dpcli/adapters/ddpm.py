"""The built-in ``ddpm`` adapter: pixel-space diffusers ``UNet2DModel`` DDPMs.

This module is the plugin entry point, so it stays cheap to import: the adapter class is
``dpcli.adapters.unet2d.DDPMAdapter``, imported when a model is actually used.
"""

from __future__ import annotations

from dpcli.adapters.base import LazyAdapter
from dpcli.hookspecs import hookimpl

DDPM = LazyAdapter(
    "ddpm",
    "pixel-space DDPM UNet (diffusers UNet2DModel; folders, pipelines, Hub ids, .ckpt/.safetensors)",
    detect="dpcli.adapters.unet2d:detect_unet2d",
    target="dpcli.adapters.unet2d:DDPMAdapter",
)


@hookimpl
def dpcli_register_adapters(register):
    register(DDPM)
