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
        return loaded.model(sample, timesteps, return_dict=False)[0]

    def ignored_layers(self, loaded: LoadedModel) -> list:
        return [loaded.model.conv_out]

    def pruner_options(self, loaded: LoadedModel) -> dict:
        from dpcli.adapters.diffusers_fixes import pruning_options

        return pruning_options(loaded.model)

    def fix_pruned_modules(self, loaded: LoadedModel, pruner) -> None:
        from dpcli.adapters.diffusers_fixes import fix_attributes, heads_after_pruning

        fix_attributes(loaded.model, heads_after_pruning(loaded.model, pruner))

    def save(self, loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
        from dpcli.io.model_format import save_model

        return save_model(loaded, folder, metadata)


@hookimpl
def dpcli_register_adapters(register):
    register(DDPMAdapter())
