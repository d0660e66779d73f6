"""SDXL: ``UNet2DConditionModel`` with added ``text_time`` conditioning and two text encoders.

The UNet takes, besides the latents, the timestep and the cross-attention context (the penultimate hidden
states of both CLIP text encoders, concatenated), ``added_cond_kwargs``: ``text_embeds`` (the pooled,
projected output of the second encoder) and ``time_ids``, six numbers per image: the original image size
(height, width), the top-left corner of the crop (top, left) and the target size (height, width), as
diffusers' ``train_text_to_image_sdxl.py`` computes them. Inside the UNet the time ids are embedded
(``add_time_proj``), concatenated with ``text_embeds`` (together ``projection_class_embeddings_input_dim``
wide, 2816 for SDXL) and projected by ``add_embedding``, whose output is added to ``time_embedding``'s.

A conditioning dict of an SDXL model has the keys ``encoder_hidden_states``, ``text_embeds`` and
``time_ids`` (with ``negative_`` twins for guidance), so guidance and batching treat them like any other.
"""

from __future__ import annotations

import torch

from dpcli.errors import BadInput

ADDED_CONDITIONING = "text_time"
TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)
ADDED_KEYS = ("text_embeds", "time_ids")
# diffusers' StableDiffusionXLPipeline samples with guidance 5.0 unless told otherwise.
SDXL_GUIDANCE_SCALE = 5.0
REFINER_REFUSAL = (
    "the SDXL refiner (one text encoder, aesthetic-score time ids) is not supported: prune and fine-tune "
    "the SDXL base model, and keep the refiner as it is"
)


def is_sdxl(unet) -> bool:
    """Whether ``unet`` takes SDXL's added ``text_time`` conditioning."""
    return getattr(unet.config, "addition_embed_type", None) == ADDED_CONDITIONING


def added_widths(unet) -> tuple[int, int]:
    """(width of ``text_embeds``, width of one embedded time id) from the UNet config."""
    config = unet.config
    time_width = int(config.addition_time_embed_dim)
    total = int(config.projection_class_embeddings_input_dim)
    return total - TIME_IDS * time_width, time_width


def check_unet(unet) -> None:
    """Refuse an added-conditioning config SDXL's six time ids cannot fill."""
    config = unet.config
    if config.addition_time_embed_dim is None or config.projection_class_embeddings_input_dim is None:
        raise BadInput(
            "the UNet's text_time conditioning needs addition_time_embed_dim and "
            "projection_class_embeddings_input_dim in its config"
        )
    pooled, _ = added_widths(unet)
    if pooled <= 0:
        raise BadInput(
            f"the UNet's added conditioning is {config.projection_class_embeddings_input_dim} wide, too "
            f"narrow for {TIME_IDS} time ids of {config.addition_time_embed_dim}"
        )


def check_encoders(unet, components: dict) -> None:
    """The two text encoders must fit the UNet: hidden sizes summing to the cross-attention width and a
    pooled projection as wide as ``text_embeds``; a refiner (one encoder, five time ids) is refused."""
    first, second = components.get("text_encoder"), components.get("text_encoder_2")
    if second is None:
        if first is not None:
            raise BadInput("an SDXL UNet needs two text encoders (text_encoder and text_encoder_2)")
        return
    pooled, time_width = added_widths(unet)
    projection = int(getattr(second.config, "projection_dim", 0) or 0)
    if first is None:
        if projection and projection + (TIME_IDS - 1) * time_width == int(
            unet.config.projection_class_embeddings_input_dim
        ):
            raise BadInput(REFINER_REFUSAL)
        raise BadInput("an SDXL UNet needs two text encoders (text_encoder and text_encoder_2)")
    if projection != pooled:
        if projection + (TIME_IDS - 1) * time_width == int(unet.config.projection_class_embeddings_input_dim):
            raise BadInput(REFINER_REFUSAL)
        raise BadInput(
            f"text_encoder_2 projects to {projection}, but the UNet's added conditioning expects "
            f"text_embeds of width {pooled}"
        )
    width = int(first.config.hidden_size) + int(second.config.hidden_size)
    cross = unet.config.cross_attention_dim
    cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
    if width != cross:
        raise BadInput(
            f"the text encoders' hidden states are {width} wide together, the UNet's cross-attention {cross}"
        )


def time_ids(
    original_sizes, crops_top_left, target_size: int, count: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``[count, 6]``: (original h, w, crop top, left, target h, w) per image. Without per-image sizes
    (sampling, or data that does not say) the image is taken as uncropped at the target size."""
    rows = []
    for row in range(count):
        original = tuple(original_sizes[row]) if original_sizes is not None else (target_size, target_size)
        crop = tuple(crops_top_left[row]) if crops_top_left is not None else (0, 0)
        rows.append([*original, *crop, target_size, target_size])
    return torch.tensor(rows, dtype=dtype, device=device)


def example_added(unet, batch_size: int, target_size: int, generator, device, dtype) -> dict:
    """Random ``text_embeds`` and uncropped ``time_ids`` of the right shapes (scoring's example inputs)."""
    pooled, _ = added_widths(unet)
    text_embeds = torch.randn((batch_size, pooled), generator=generator).to(device, dtype)
    ids = time_ids(None, None, target_size, batch_size, device, dtype)
    return {"text_embeds": text_embeds, "time_ids": ids}


def added_cond_kwargs(conditioning: dict) -> dict | None:
    """``added_cond_kwargs`` for the UNet from a conditioning dict (None when it has neither key)."""
    if not any(key in conditioning for key in ADDED_KEYS):
        return None
    missing = [key for key in ADDED_KEYS if key not in conditioning]
    if missing:
        raise BadInput(f"SDXL conditioning without {missing[0]}")
    return {key: conditioning[key] for key in ADDED_KEYS}
