"""The ``dit`` adapter's plugin module: registered through the entry point, so it imports no torch.

Every method defers to ``dpcli_dit.model``, which is imported only once a DiT is really loaded.
"""

from __future__ import annotations

from pathlib import Path

from dpcli.adapters.base import BatchContext, LoadedModel, ModelAdapter, ModelSource, no_prompt
from dpcli.hookspecs import hookimpl


class DiTAdapter(ModelAdapter):
    name = "dit"
    description = "diffusers DiT (DiTTransformer2DModel): class-conditional, pixel or latent (with its VAE)"

    def detect(self, source: ModelSource) -> float:
        from dpcli_dit import model

        return model.detect(source)

    def load(self, source: ModelSource, config: Path | None = None) -> LoadedModel:
        from dpcli_dit import model

        return model.load(source, self.name, config)

    def example_inputs(self, loaded: LoadedModel, batch_size: int = 1) -> tuple:
        from dpcli_dit import model

        return model.example_inputs(loaded, batch_size)

    def predict(self, loaded: LoadedModel, sample, timesteps, conditioning=None):
        from dpcli_dit import model

        return model.predict(loaded, sample, timesteps, conditioning)

    def sampling_conditioning(self, loaded: LoadedModel, batch_size: int, generator=None, **options):
        from dpcli_dit import model

        return model.sampling_conditioning(loaded, batch_size, generator, **options)

    def denoise(self, loaded: LoadedModel, sample, timesteps, conditioning=None, guidance_scale: float = 1.0):
        from dpcli_dit import model

        return model.denoise(loaded, sample, timesteps, conditioning, guidance_scale)

    def decode(self, loaded: LoadedModel, sample):
        from dpcli_dit import model

        return model.decode(loaded, sample)

    def data_size(self, loaded: LoadedModel) -> int:
        from dpcli_dit import model

        return model.data_size(loaded)

    def data_channels(self, loaded: LoadedModel) -> int:
        from dpcli_dit import model

        return model.data_channels(loaded)

    def prepare_batch(self, loaded: LoadedModel, images, context: BatchContext):
        from dpcli_dit import model

        if context.prompt is not None:
            raise no_prompt(self.name)
        return model.prepare_batch(loaded, images)

    def ignored_layers(self, loaded: LoadedModel) -> list:
        from dpcli_dit import model

        return model.ignored_layers(loaded)

    def pruner_options(self, loaded: LoadedModel) -> dict:
        from dpcli.adapters.diffusers_fixes import pruning_options

        return pruning_options(loaded.model)

    def fix_pruned_modules(self, loaded: LoadedModel, pruner) -> None:
        from dpcli.adapters.diffusers_fixes import fix_attributes, heads_after_pruning

        fix_attributes(loaded.model, heads_after_pruning(loaded.model, pruner))

    def save(self, loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
        from dpcli_dit import model

        return model.save(loaded, folder, metadata)


@hookimpl
def dpcli_register_adapters(register):
    register(DiTAdapter())
