"""A full SDXL base pipeline folder with random weights, written offline, for `dp score` at SDXL size.

`config:sdxl-base-1.0` is the UNet alone (its architecture, random weights); `dp score --data` also
needs the autoencoder and both text encoders to encode the calibration images and their captions. This
writes, from the configs shipped beside the UNet config (dpcli/resources/configs/sdxl-base-1.0/), a
diffusers StableDiffusionXLPipeline folder that dp loads as it loads a downloaded one:

- unet/: the SDXL base UNet (2,567,463,684 params), built by `dpcli.load(..., weights_dtype=DTYPE)`,
  so bf16 never goes through float32; saved in 1 GB shards (a save copies one shard at a time);
- vae/, text_encoder/ (CLIPTextModel), text_encoder_2/ (CLIPTextModelWithProjection): the real configs,
  random weights drawn in DTYPE;
- tokenizer/, tokenizer_2/: CLIP's byte alphabet without merges (offline; ids fit the 49,408 vocabulary);
- scheduler/: SDXL's EulerDiscreteScheduler config.

Speed and memory do not depend on the values. `--width-scale S` scales the UNet's block_out_channels
(320, 640, 1280 × S; each must be a multiple of 32 for GroupNorm(32)) with about 64 channels per attention
head, as SDXL has; the autoencoder and both text encoders stay full size (benchmarks/sdxl_memory.py fits
memory against UNet size this way). `--components-from PIPELINE` links the autoencoder, text encoders,
tokenizers and scheduler of an already written pipeline instead of writing them again.

Usage: python benchmarks/sdxl_pipeline.py FOLDER [--dtype bf16] [--sample-size 64] [--width-scale 0.5]
[--images N --image-size 512] (N captioned random images in FOLDER/images).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "dpcli" / "resources" / "configs"
TOKENS = 77


def byte_level_tokenizer(folder: Path):
    """dpcli.testing's CLIP tokenizer with CLIP's byte alphabet and no merges, written offline."""
    from dpcli.testing import byte_level_tokenizer as write_tokenizer

    return write_tokenizer(folder, TOKENS)


def scaled_unet_config(config: dict, width_scale: float) -> dict:
    """SDXL's UNet config with its block_out_channels × ``width_scale`` and about 64 channels per head
    (SDXL: 5, 10, 20 heads of 64); a ValueError when a width is not a positive multiple of 32."""
    if width_scale == 1:
        return dict(config)
    widths = [round(width * width_scale) for width in config["block_out_channels"]]
    bad = [width for width in widths if width <= 0 or width % 32]
    if bad:
        raise ValueError(
            f"--width-scale {width_scale} gives block_out_channels {widths}: each must be a positive multiple "
            "of 32 (GroupNorm with 32 groups); use a multiple of 0.1"
        )
    heads = [max(1, round(width / 64)) for width in widths]
    if any(width % count for width, count in zip(widths, heads, strict=True)):
        raise ValueError(f"--width-scale {width_scale}: widths {widths} do not split into {heads} heads")
    return {**config, "block_out_channels": widths, "attention_head_dim": heads}


COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def write_pipeline(
    folder: Path,
    dtype_name: str = "bf16",
    sample_size: int | None = None,
    width_scale: float = 1.0,
    components_from: Path | None = None,
) -> Path:
    import gc

    import diffusers
    import torch
    import transformers

    import dpcli
    from dpcli.weights_dtype import WEIGHTS_DTYPES, default_dtype

    dtype = WEIGHTS_DTYPES[dtype_name]
    shipped = CONFIGS / "sdxl-base-1.0"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((CONFIGS / "sdxl-base-1.0.json").read_text())
    config = scaled_unet_config(config, width_scale)
    if sample_size:
        config["sample_size"] = sample_size
    config_file = folder / "unet-config.json"
    config_file.write_text(json.dumps(config))
    unet = dpcli.load(config_file, weights_dtype=dtype_name).loaded.model
    unet.save_pretrained(folder / "unet", max_shard_size="1GB")
    del unet
    gc.collect()
    config_file.unlink()
    if components_from is not None:
        for name in COMPONENTS:
            (folder / name).symlink_to((Path(components_from) / name).resolve(), target_is_directory=True)
        write_index(folder)
        return folder
    torch.manual_seed(0)
    with default_dtype(dtype):
        vae = diffusers.AutoencoderKL.from_config(json.loads((shipped / "vae" / "config.json").read_text()))
        vae.save_pretrained(folder / "vae")
        del vae
        for name, class_name in (
            ("text_encoder", "CLIPTextModel"),
            ("text_encoder_2", "CLIPTextModelWithProjection"),
        ):
            text_config = transformers.CLIPTextConfig.from_pretrained(str(shipped / name))
            text_config.dtype = text_config.torch_dtype = dtype
            encoder = getattr(transformers, class_name)(text_config)
            encoder.save_pretrained(folder / name)
            del encoder
            gc.collect()
    tokenizer = byte_level_tokenizer(folder / "tokenizer-files")
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(folder / name)
    shutil.rmtree(folder / "tokenizer-files")
    shutil.copytree(shipped / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    write_index(folder)
    return folder


def write_index(folder: Path) -> None:
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_images(folder: Path, count: int, size: int) -> Path:
    """``count`` random ``size``-pixel RGB PNGs, each with a sidecar caption (image.txt)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{index:03d}.png"
        )
        (folder / f"{index:03d}.txt").write_text(f"a photo of random pixels, number {index}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--sample-size", type=int, default=None, help="the UNet's latent size (64: 512 px)")
    parser.add_argument(
        "--width-scale",
        type=float,
        default=1.0,
        help="scale the UNet's block_out_channels (multiples of 0.1)",
    )
    parser.add_argument(
        "--components-from",
        type=Path,
        default=None,
        help="link VAE, text encoders, tokenizers from this pipeline",
    )
    parser.add_argument("--images", type=int, default=0, help="also write this many captioned images")
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args()
    try:
        scaled_unet_config(json.loads((CONFIGS / "sdxl-base-1.0.json").read_text()), args.width_scale)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    write_pipeline(
        args.folder / "pipeline", args.dtype, args.sample_size, args.width_scale, args.components_from
    )
    if args.images:
        write_images(args.folder / "images", args.images, args.image_size)
    print(args.folder)


if __name__ == "__main__":
    main()
