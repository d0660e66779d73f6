"""What the hooks need to know about a loaded latent model (conditioning kind, latent scaling, ...)."""

from __future__ import annotations

import torch

from dpcli.adapters.base import ConditioningSpec, LoadedModel
from dpcli.errors import BadInput


def has_cross_attention(unet) -> bool:
    blocks = [
        *getattr(unet, "down_blocks", []),
        getattr(unet, "mid_block", None),
        *getattr(unet, "up_blocks", []),
    ]
    return any(getattr(block, "has_cross_attention", False) for block in blocks if block is not None)


def latent_facts(loaded: LoadedModel) -> dict:
    unet = loaded.model
    components = loaded.components
    vae = components.get("vae")
    class_table = getattr(unet, "class_embedding", None)
    facts: dict = {"conditioning": "none", "num_classes": None, "null_class": None, "context_length": None}
    if "class_embedder" in components:
        table = components["class_embedder"].num_embeddings
        # CompVis ClassEmbedder convention: the last class is the unconditional one.
        facts.update(
            conditioning="class-context", num_classes=table - 1, null_class=table - 1, context_length=1
        )
    elif "text_encoder" in components:
        if not has_cross_attention(unet):
            raise BadInput("the pipeline has a text encoder but its UNet has no cross-attention")
        tokenizer = components.get("tokenizer")
        positions = int(components["text_encoder"].config.max_position_embeddings)
        length = min(int(tokenizer.model_max_length), positions) if tokenizer is not None else positions
        facts.update(conditioning="text", context_length=length)
    elif isinstance(class_table, torch.nn.Embedding):
        facts.update(conditioning="class", num_classes=class_table.num_embeddings)
    elif has_cross_attention(unet):
        facts.update(conditioning="missing", context_length=77)
    if vae is not None:
        facts.update(
            scaling_factor=float(getattr(vae.config, "scaling_factor", 1.0) or 1.0),
            shift_factor=getattr(vae.config, "shift_factor", None),
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
    return facts


# diffusers' StableDiffusionPipeline samples with classifier-free guidance 7.5 unless told otherwise.
TEXT_GUIDANCE_SCALE = 7.5


def conditioning_spec(loaded: LoadedModel) -> ConditioningSpec:
    """Text models: prompts, guidance 7.5 by default (the empty prompt is the unconditional input).
    Class models: labels; guidance only where a null class exists (the CompVis class embedder's last
    class), off by default as no diffusers pipeline samples these with guidance."""
    extras = loaded.extras
    kind = extras["conditioning"]
    if kind == "text":
        return ConditioningSpec("text", None, TEXT_GUIDANCE_SCALE, True)
    if kind in ("class", "class-context"):
        return ConditioningSpec(
            "class", int(extras["num_classes"]), 1.0, extras.get("null_class") is not None
        )
    return ConditioningSpec()


def describe(loaded: LoadedModel) -> str:
    """One line for ``dp inspect``: latent and pixel sizes, autoencoder, conditioning."""
    extras = loaded.extras
    size, channels = loaded.sample_size, loaded.in_channels
    vae = loaded.components.get("vae")
    if vae is None:
        latent = f"latent diffusion UNet on {channels}x{size}x{size} latents (no autoencoder loaded)"
    else:
        factor = extras["vae_scale_factor"]
        latent = (
            f"latent diffusion: UNet on {channels}x{size}x{size} latents of {size * factor}x{size * factor} "
            f"images ({type(vae).__name__}, x{factor}, latents scaled by {extras['scaling_factor']:g})"
        )
    kind = extras["conditioning"]
    if kind == "text":
        encoder = type(loaded.components["text_encoder"]).__name__
        conditioning = f"text ({encoder}, {extras['context_length']} tokens)"
    elif kind == "class":
        conditioning = f"class labels ({extras['num_classes']} classes)"
    elif kind == "class-context":
        conditioning = (
            f"class labels as cross-attention context ({extras['num_classes']} classes + unconditional)"
        )
    elif kind == "missing":
        conditioning = "cross-attention context expected, but no text encoder or class embedder was found"
    else:
        conditioning = "unconditional"
    return f"{latent}; conditioning: {conditioning}"


def require_autoencoder(loaded: LoadedModel):
    vae = loaded.components.get("vae")
    if vae is None:
        raise BadInput(
            f"{loaded.source} has no autoencoder: images cannot be encoded or decoded; point dp at the whole "
            "pipeline folder (with vae/ or vqvae/)"
        )
    return vae


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
