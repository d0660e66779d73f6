"""SDXL through the ldm adapter: two text encoders, added text_time conditioning, end to end.

The pipeline is diffusers' own tiny SDXL test config (tests/pipelines/stable_diffusion_xl: two CLIP text
encoders of width 32, the second with a 32-wide projection, addition_time_embed_dim 8, 80-wide added
conditioning, transformer_layers_per_block (1, 2), linear projections), with the UNet widened from 2/4 to
32/64 channels so there is something to prune, and test_ldm's offline byte-level CLIP tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

pytest.importorskip("transformers")

from test_ldm import byte_level_tokenizer, kl_autoencoder  # noqa: E402

SDXL_BASE_PARAMS = 2_567_463_684


def sdxl_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,  # 6 * 8 + 32
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        **overrides,
    }
    return UNet2DConditionModel(**config).eval()


def sdxl_text_encoders(vocab: int, tokens: int = 8, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=vocab,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=tokens,
    )
    torch.manual_seed(seed)
    first = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(config).eval()
    return first, second


def write_sdxl_pipeline(folder: Path, tokenizer_files: Path, unet=None, refiner: bool = False) -> Path:
    """A StableDiffusionXLPipeline folder saved component by component, as diffusers writes one."""
    from diffusers import EulerDiscreteScheduler

    tokenizer = byte_level_tokenizer(tokenizer_files)
    first, second = sdxl_text_encoders(len(tokenizer))
    parts = {
        "unet": unet if unet is not None else sdxl_unet(),
        "vae": kl_autoencoder(),
        "text_encoder": None if refiner else first,
        "tokenizer": None if refiner else tokenizer,
        "text_encoder_2": second,
        "tokenizer_2": tokenizer,
    }
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    for name, component in parts.items():
        if component is None:
            index[name] = [None, None]
            continue
        component.save_pretrained(folder / name)
        library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(component).__name__]
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    scheduler.save_config(folder / "scheduler")
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    made = {"root": root, "pipeline": write_sdxl_pipeline(root / "pipeline", root / "tokenizer-files")}
    images = make_image_folder(root / "images", count=6, size=20)
    made["images"] = images
    return made


# config:sdxl-base-1.0 -------------------------------------------------------------------------------------


def test_builtin_sdxl_base_config_is_the_real_unet():
    """The shipped config builds (on the meta device: no memory) into SDXL base's 2,567,463,684 parameters."""
    from diffusers import UNet2DConditionModel

    from dpcli.adapters.unet2d import CONFIGS

    config = json.loads((CONFIGS / "sdxl-base-1.0.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) == SDXL_BASE_PARAMS
    assert unet.add_embedding.linear_1.in_features == 2816


def test_builtin_sdxl_config_goes_to_the_ldm_adapter():
    from dpcli.loading import choose_adapter, resolve_source

    assert choose_adapter(resolve_source("config:sdxl-base-1.0")).name == "ldm"
    assert choose_adapter(resolve_source("config:ddpm-cifar10-32")).name == "ddpm"


def test_inspect_sdxl_unet_config_counts_params_and_macs(dp, tmp_path):
    unet = sdxl_unet()
    unet.save_config(tmp_path)
    config = tmp_path / "config.json"
    report = dp("inspect", config, "--json").json
    assert report["adapter"] == "ldm"
    assert report["params"] == sum(p.numel() for p in unet.parameters())
    assert report["macs"] > 0
    assert any("SDXL" in note for note in report["notes"])
    names = {row["name"] for row in report["layers"]}
    assert {"add_embedding.linear_1", "add_embedding.linear_2"} <= names
