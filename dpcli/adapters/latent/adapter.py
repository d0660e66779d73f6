"""The ``ldm`` adapter class: the functions of ``hooks``, ``facts``, ``load`` and ``save`` as its methods.

``dpcli.adapters.ldm`` registers it lazily, so this module (and torch) is imported only when a model is used.
"""

from __future__ import annotations

from pathlib import Path

from dpcli.adapters.base import DiffusersAdapter, LoadedModel, ModelSource
from dpcli.adapters.latent import facts, hooks
from dpcli.adapters.latent.load import load_latent
from dpcli.adapters.latent.save import save_latent


class LatentDiffusionAdapter(DiffusersAdapter):
    """A latent diffusion UNet with its autoencoder (and text encoder or class embedder)."""

    example_inputs = staticmethod(hooks.example_inputs)
    predict = staticmethod(hooks.predict)
    conditioning_spec = staticmethod(facts.conditioning_spec)
    sampling_conditioning = staticmethod(hooks.sampling_conditioning)
    denoise = staticmethod(hooks.denoise)
    decode = staticmethod(hooks.decode)
    data_size = staticmethod(hooks.data_size)
    data_channels = staticmethod(hooks.data_channels)
    prepare_batch = staticmethod(hooks.prepare_batch)
    encode_images = staticmethod(hooks.encode_images)
    autoencoder = staticmethod(facts.require_autoencoder)
    pruner_options = staticmethod(hooks.pruner_options)
    save = staticmethod(save_latent)

    def load(self, source: ModelSource, config: Path | None = None) -> LoadedModel:
        return load_latent(source, self.name, config)

    def check_data(self, loaded: LoadedModel, source, prompt: str | None = None) -> None:
        hooks.refuse_missing_conditioning(loaded)
        super().check_data(loaded, source, prompt)
