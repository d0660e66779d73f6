"""The built-in ``ldm`` adapter: latent diffusion UNets with their autoencoder (and text encoder).

Unconditional ``UNet2DModel`` over a ``VQModel``/``AutoencoderKL`` (LDMPipeline), text-conditional
``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x layout) and class-conditional UNets, from diffusers
pipeline folders, Hub ids, dpcli folders and single-file CompVis / Stable Diffusion checkpoints. Only the
UNet is pruned; the other components are kept as they are.

This module is the plugin entry point, so it stays cheap to import; the machinery is in the package
``dpcli.adapters.latent`` (``detect``, ``load``, ``facts``, ``hooks``, ``save``; ``compvis`` for single
files), imported when a model is actually loaded.
"""

from __future__ import annotations

from pathlib import Path

from dpcli.adapters.base import BatchContext, ConditioningSpec, LoadedModel, ModelAdapter, ModelSource
from dpcli.hookspecs import hookimpl


class LatentDiffusionAdapter(ModelAdapter):
    name = "ldm"
    description = (
        "latent diffusion UNet + autoencoder (LDM, Stable Diffusion 1.x/2.x, class-conditional; "
        "pipelines, Hub ids, CompVis .ckpt/.safetensors)"
    )

    def detect(self, source: ModelSource) -> float:
        from dpcli.adapters.latent.detect import detect_latent

        return detect_latent(source)

    def load(self, source: ModelSource, config: Path | None = None) -> LoadedModel:
        from dpcli.adapters.latent.load import load_latent

        return load_latent(source, self.name, config)

    def example_inputs(self, loaded: LoadedModel, batch_size: int = 1) -> tuple:
        from dpcli.adapters.latent.hooks import example_inputs

        return example_inputs(loaded, batch_size)

    def predict(self, loaded: LoadedModel, sample, timesteps, conditioning=None):
        from dpcli.adapters.latent.hooks import predict

        return predict(loaded, sample, timesteps, conditioning)

    def conditioning_spec(self, loaded: LoadedModel) -> ConditioningSpec:
        from dpcli.adapters.latent.facts import conditioning_spec

        return conditioning_spec(loaded)

    def sampling_conditioning(self, loaded: LoadedModel, batch_size: int, generator=None, **options):
        from dpcli.adapters.latent.hooks import sampling_conditioning

        return sampling_conditioning(loaded, batch_size, generator, **options)

    def denoise(self, loaded: LoadedModel, sample, timesteps, conditioning=None, guidance_scale: float = 1.0):
        from dpcli.adapters.latent.hooks import denoise

        return denoise(loaded, sample, timesteps, conditioning, guidance_scale)

    def decode(self, loaded: LoadedModel, sample):
        from dpcli.adapters.latent.hooks import decode

        return decode(loaded, sample)

    def data_size(self, loaded: LoadedModel) -> int:
        from dpcli.adapters.latent.hooks import data_size

        return data_size(loaded)

    def data_channels(self, loaded: LoadedModel) -> int:
        from dpcli.adapters.latent.hooks import data_channels

        return data_channels(loaded)

    def prepare_batch(self, loaded: LoadedModel, images, context: BatchContext):
        from dpcli.adapters.latent.hooks import prepare_batch

        return prepare_batch(loaded, images, context)

    def check_data(self, loaded: LoadedModel, source, prompt: str | None = None) -> None:
        from dpcli.adapters.latent.hooks import refuse_missing_conditioning

        refuse_missing_conditioning(loaded)
        super().check_data(loaded, source, prompt)

    def encode_images(self, loaded: LoadedModel, images):
        from dpcli.adapters.latent.hooks import encode_images

        return encode_images(loaded, images)

    def autoencoder(self, loaded: LoadedModel):
        from dpcli.adapters.latent.facts import require_autoencoder

        return require_autoencoder(loaded)

    def ignored_layers(self, loaded: LoadedModel) -> list:
        return [loaded.model.conv_out]

    def pruner_options(self, loaded: LoadedModel) -> dict:
        from dpcli.adapters.latent.hooks import pruner_options

        return pruner_options(loaded)

    def fix_pruned_modules(self, loaded: LoadedModel, pruner) -> None:
        from dpcli.adapters.diffusers_fixes import fix_attributes, heads_after_pruning

        fix_attributes(loaded.model, heads_after_pruning(loaded.model, pruner))

    def save(self, loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
        from dpcli.adapters.latent.save import save_latent

        return save_latent(loaded, folder, metadata)


@hookimpl
def dpcli_register_adapters(register):
    register(LatentDiffusionAdapter())
