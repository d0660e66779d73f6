"""The built-in ``ddpm`` adapter: pixel-space diffusers ``UNet2DModel`` DDPMs.

This module is the plugin entry point, so it stays cheap to import; the machinery is in
``dpcli.adapters.unet2d`` and is imported when a model is actually loaded.
"""

from __future__ import annotations

from pathlib import Path

from dpcli.adapters.base import LoadedModel, ModelAdapter, ModelSource
from dpcli.hookspecs import hookimpl


class DDPMAdapter(ModelAdapter):
    name = "ddpm"
    description = (
        "pixel-space DDPM UNet (diffusers UNet2DModel; folders, pipelines, Hub ids, .ckpt/.safetensors)"
    )

    def detect(self, source: ModelSource) -> float:
        from dpcli.adapters.unet2d import detect_unet2d

        return detect_unet2d(source)

    def load(self, source: ModelSource, config: Path | None = None) -> LoadedModel:
        from dpcli.adapters.unet2d import load_unet2d

        return load_unet2d(source, self.name, config)

    def example_inputs(self, loaded: LoadedModel, batch_size: int = 1) -> tuple:
        from dpcli.adapters.unet2d import example_inputs

        return example_inputs(loaded, batch_size)

    def predict(self, loaded: LoadedModel, sample, timesteps, conditioning=None):
        from dpcli.adapters.unet2d import predict

        return predict(loaded, sample, timesteps, conditioning)


@hookimpl
def dpcli_register_adapters(register):
    register(DDPMAdapter())
