"""Tiny random-init latent pipelines from the real diffusers / transformers classes (VQModel,
AutoencoderKL, UNet2DModel, UNet2DConditionModel, CLIPTextModel) and a byte-level CLIP tokenizer written
offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli import testing

CROSS_WIDTH = 64  # text hidden size = cross-attention width (one 64-wide head, like CLIP's)
TOKENS = 8


def byte_level_tokenizer(folder: Path, max_length: int = TOKENS):
    """dpcli.testing's offline byte-level CLIP tokenizer, at the tiny encoders' TOKENS."""
    return testing.byte_level_tokenizer(folder, max_length)


def text_encoder(vocab: int, act: str = "quick_gelu", layers: int = 2, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=CROSS_WIDTH,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=1,
        max_position_embeddings=TOKENS,
        hidden_act=act,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    return CLIPTextModel(config).eval()


def kl_autoencoder(groups: int = 4, widths=(8, 16), seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=4,
        norm_num_groups=groups,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def vq_autoencoder(groups: int = 4, widths=(8, 16), seed: int = 0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=3,
        num_vq_embeddings=16,
        vq_embed_dim=3,
        norm_num_groups=groups,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=1.0,
    ).eval()


def cross_attention_unet(groups: int = 8, seed: int = 0, **overrides):
    """SD layout in miniature: cross-attention at the first level, 4 heads, GEGLU feed-forward."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": CROSS_WIDTH,
        "attention_head_dim": 4,
        "layers_per_block": 1,
        "norm_num_groups": groups,
        **overrides,
    }
    return UNet2DConditionModel(**config).eval()


def latent_unet2d(in_channels: int = 3, num_class_embeds: int | None = None, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=num_class_embeds,
    ).eval()


def write_pipeline(folder: Path, unet, vae, vae_key="vae", text=None, tokenizer=None, scheduler=None) -> Path:
    """A diffusers pipeline folder: each component saved with save_pretrained, plus model_index.json."""
    from diffusers import DDIMScheduler

    scheduler = scheduler or DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    index = {"_class_name": "StableDiffusionPipeline" if text is not None else "LDMPipeline"}
    parts = {"unet": unet, vae_key: vae, "text_encoder": text, "tokenizer": tokenizer}
    for name, component in parts.items():
        if component is not None:
            component.save_pretrained(folder / name)
            library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
            index[name] = [library, type(component).__name__]
    scheduler.save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_text_pipeline(folder: Path, tokenizer_files: Path, scheduler=None) -> Path:
    """The tiny SD-layout text pipeline folder (cross-attention UNet, KL autoencoder, CLIP text encoder and
    the byte-level tokenizer written into ``tokenizer_files``)."""
    tokenizer = byte_level_tokenizer(tokenizer_files)
    return write_pipeline(
        folder,
        cross_attention_unet(),
        kl_autoencoder(),
        text=text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )
