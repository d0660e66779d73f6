"""The built-in ``ldm`` adapter: latent diffusion UNets with their autoencoder (and text encoder).

Unconditional ``UNet2DModel`` over a ``VQModel``/``AutoencoderKL`` (LDMPipeline), text-conditional
``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x layout) and class-conditional UNets, from diffusers
pipeline folders, Hub ids, dpcli folders and single-file CompVis / Stable Diffusion checkpoints. Only the
UNet is pruned; the other components are kept as they are.

This module is the plugin entry point, so it stays cheap to import: the adapter class is
``dpcli.adapters.latent.adapter.LatentDiffusionAdapter`` (its machinery in the package ``dpcli.adapters.latent``:
``detect``, ``load``, ``facts``, ``hooks``, ``save``; ``compvis`` for single files), imported when a model is
actually used.
"""

from __future__ import annotations

from dpcli.adapters.base import LazyAdapter
from dpcli.hookspecs import hookimpl

LDM = LazyAdapter(
    "ldm",
    "latent diffusion UNet + autoencoder (LDM, Stable Diffusion 1.x/2.x, class-conditional; "
    "pipelines, Hub ids, CompVis .ckpt/.safetensors)",
    detect="dpcli.adapters.latent.detect:detect_latent",
    target="dpcli.adapters.latent.adapter:LatentDiffusionAdapter",
)


@hookimpl
def dpcli_register_adapters(register):
    register(LDM)
