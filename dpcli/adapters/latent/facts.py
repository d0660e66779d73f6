"""What the hooks need to know about a loaded latent model (conditioning kind, latent scaling, ...)."""

from __future__ import annotations

import torch

from dpcli.adapters.base import ConditioningSpec, LoadedModel
from dpcli.adapters.latent.sdxl import ADDED_CONDITIONING, SDXL_GUIDANCE_SCALE, check_encoders, is_sdxl
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
    elif "text_encoder" in components or "text_encoder_2" in components:
        if not has_cross_attention(unet):
            raise BadInput("the pipeline has a text encoder but its UNet has no cross-attention")
        if is_sdxl(unet):
            check_encoders(unet, components)
        elif "text_encoder_2" in components:
            raise BadInput("a second text encoder needs a UNet with SDXL's text_time added conditioning")
        lengths = []
        for suffix in ("", "_2"):
            if f"text_encoder{suffix}" not in components:
                continue
            tokenizer = components.get(f"tokenizer{suffix}")
            positions = int(components[f"text_encoder{suffix}"].config.max_position_embeddings)
            lengths.append(
                min(int(tokenizer.model_max_length), positions) if tokenizer is not None else positions
            )
        facts.update(conditioning="text", context_length=min(lengths))
    elif isinstance(class_table, torch.nn.Embedding):
        facts.update(conditioning="class", num_classes=class_table.num_embeddings)
    elif has_cross_attention(unet):
        facts.update(conditioning="missing", context_length=77)
    if is_sdxl(unet):
        facts["added_conditioning"] = ADDED_CONDITIONING
        if facts["conditioning"] == "text":
            facts["force_zeros_for_empty_prompt"] = True  # StableDiffusionXLPipeline's default
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
        scale = SDXL_GUIDANCE_SCALE if extras.get("added_conditioning") else TEXT_GUIDANCE_SCALE
        return ConditioningSpec("text", None, scale, True)
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
    if kind == "text" and extras.get("added_conditioning"):
        first, second = loaded.components["text_encoder"], loaded.components["text_encoder_2"]
        conditioning = (
            f"text, SDXL ({type(first).__name__} + {type(second).__name__}, {extras['context_length']} "
            "tokens; pooled text embeddings and 6 size/crop time ids as added conditioning)"
        )
    elif kind == "text":
        encoder = type(loaded.components["text_encoder"]).__name__
        conditioning = f"text ({encoder}, {extras['context_length']} tokens)"
    elif kind == "class":
        conditioning = f"class labels ({extras['num_classes']} classes)"
    elif kind == "class-context":
        conditioning = (
            f"class labels as cross-attention context ({extras['num_classes']} classes + unconditional)"
        )
    elif kind == "missing" and extras.get("added_conditioning"):
        conditioning = (
            "SDXL (two text encoders + pooled text embeddings and 6 size/crop time ids expected; no text "
            "encoders loaded)"
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
