"""Write a Stable Diffusion 1.5-shaped pipeline folder with random weights, and 512x512 calibration images.

The UNet, autoencoder and text encoder use the SD 1.5 configs (written out here, nothing is downloaded);
the tokenizer is a byte-level CLIP tokenizer with no merges (built offline), padded to 77 tokens like
SD's. Used by the measurement in benchmarks/ldm_sd15.md:

    python benchmarks/sd15_pipeline.py /tmp/sd15          # writes /tmp/sd15/pipeline and /tmp/sd15/images
    dp prune /tmp/sd15/pipeline --criterion diff-taylor --target-macs 0.5 --data /tmp/sd15/images \
        --calib-size 1 --timesteps 3 -o /tmp/sd15/pruned
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dpcli.testing import byte_level_tokenizer

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def main(target: Path) -> None:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    pipeline = target / "pipeline"
    UNet2DConditionModel(**SD15_UNET).save_pretrained(pipeline / "unet")
    AutoencoderKL(**SD15_VAE).save_pretrained(pipeline / "vae")
    CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).save_pretrained(pipeline / "text_encoder")
    byte_level_tokenizer(target / "tokenizer-files").save_pretrained(pipeline / "tokenizer")
    DDIMScheduler(**SD15_SCHEDULER).save_config(pipeline / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (pipeline / "model_index.json").write_text(json.dumps(index, indent=2))
    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(images / f"{index}.png")
    (images / "captions.txt").write_text("0.png\ta photo of a cat\n1.png\ta painting of a lighthouse\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd15"))
