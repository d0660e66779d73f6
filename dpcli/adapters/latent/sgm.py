"""SDXL single files in the original key layout (Stability's ``generative-models``, "SGM"), as users
download them: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, transformers names) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, with its text projection).

The keys are converted with diffusers' own single-file functions (``diffusers.loaders.single_file_utils``)
against configs read from disk, never fetched: by default the SDXL base 1.0 configs shipped with dp
(``dpcli/resources/configs/sdxl-base-1.0.json`` for the UNet, ``sdxl-base-1.0/{vae,text_encoder,
text_encoder_2,scheduler}`` for the rest), or ``--config``: a folder laid out like a diffusers SDXL pipeline
(``unet/config.json``, ``vae/config.json``, ...; weights not needed) or the UNet's config.json alone.
Tokenizers are not in the checkpoint: ``tokenizer/`` and ``tokenizer_2/`` folders beside it, else the
Hugging Face cache (never downloaded).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from dpcli.adapters.base import ModelSource
from dpcli.adapters.latent.sdxl import REFINER_REFUSAL
from dpcli.errors import BadInput

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only embedder is OpenCLIP
TOKENIZER_REPOS = {
    "tokenizer": [
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
        ("openai/clip-vit-large-patch14", None),
    ],
    "tokenizer_2": [
        ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
        ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
    ],
}


def is_sgm_state_dict(state_dict) -> bool:
    """An SGM (SDXL) checkpoint: a UNet and ``conditioner.embedders`` text encoders."""
    keys = list(state_dict)
    return any(k.startswith(UNET_PREFIX) for k in keys) and any(
        k.startswith("conditioner.embedders.") for k in keys
    )


def _configs(config_path: Path | None) -> tuple[dict, Path, list[str]]:
    """(UNet config, folder of the other configs, notes) for ``--config`` or the shipped SDXL base 1.0."""
    from dpcli.adapters.unet2d import CONFIGS
    from dpcli.io.diffusers_files import read_config_file

    shipped = CONFIGS / "sdxl-base-1.0"
    if config_path is None:
        return (
            read_config_file(CONFIGS / "sdxl-base-1.0.json"),
            shipped,
            ["configs: SDXL base 1.0, shipped with dp"],
        )
    config_path = Path(config_path)
    if config_path.is_dir():
        unet_file = config_path / "unet" / "config.json"
        if not unet_file.is_file():
            raise BadInput(f"--config {config_path} has no unet/config.json (an SDXL pipeline folder layout)")
        return read_config_file(unet_file), config_path, [f"configs from {config_path}"]
    return read_config_file(config_path), shipped, [f"UNet config from {config_path}, the rest SDXL base 1.0"]


def _component_config(folder: Path, name: str, fallback: Path) -> Path:
    return folder / name if (folder / name).is_dir() else fallback / name


def load_sgm(source: ModelSource, config_path: Path | None, notes: list[str]):
    """``(unet, components, scheduler, scheduler origin)`` of an SGM single file, converted on load."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    from dpcli.adapters.latent.load import _find_tokenizer, _transformers, build_text_encoder, instantiate
    from dpcli.adapters.unet2d import CONFIGS
    from dpcli.io.diffusers_files import load_scheduler, read_config_file

    state_dict = source.state_dict()
    keys = list(state_dict)
    if any(k.startswith(REFINER_PREFIX) for k in keys) and not any(k.startswith(CLIP_PREFIX) for k in keys):
        raise BadInput(REFINER_REFUSAL)
    if not any(k.startswith(OPEN_CLIP_PREFIX) for k in keys) or not any(
        k.startswith(CLIP_PREFIX) for k in keys
    ):
        raise BadInput(
            f"{source.path} has conditioner weights but not SDXL's two text encoders ({CLIP_PREFIX}*, "
            f"{OPEN_CLIP_PREFIX}*)"
        )
    unet_config, folder, config_notes = _configs(config_path)
    notes.extend(config_notes)
    shipped = CONFIGS / "sdxl-base-1.0"
    origin = str(source.path)
    try:
        unet_weights = convert_ldm_unet_checkpoint(state_dict, dict(unet_config))
        vae_config = read_config_file(_component_config(folder, "vae", shipped))
        vae_weights = convert_ldm_vae_checkpoint(state_dict, dict(vae_config))
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise BadInput(f"{origin} does not fit the SDXL configs ({config_notes[0]}): {exc}") from None
    unet = instantiate("UNet2DConditionModel", unet_config, unet_weights, f"{origin} (UNet)")
    components = {"vae": instantiate("AutoencoderKL", vae_config, vae_weights, f"{origin} (first stage)")}
    transformers = _transformers()
    for name, class_name in (
        ("text_encoder", "CLIPTextModel"),
        ("text_encoder_2", "CLIPTextModelWithProjection"),
    ):
        path = _component_config(folder, name, shipped)
        try:
            text_config = transformers.CLIPTextConfig.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise BadInput(f"{path}: unreadable text encoder config ({str(exc).splitlines()[0]})") from None
        if name == "text_encoder":
            weights = convert_ldm_clip_checkpoint(state_dict)
        else:
            weights = convert_open_clip_checkpoint(
                SimpleNamespace(config=text_config), state_dict, prefix=OPEN_CLIP_PREFIX
            )
        components[name] = build_text_encoder(text_config, weights, f"{origin} ({name})", class_name)
    for name, candidates in TOKENIZER_REPOS.items():
        tokenizer = _find_tokenizer(source.path, candidates, folder=name)
        if tokenizer is None:
            notes.append(
                f"no {name} found (a {name}/ folder beside the checkpoint, or the Hugging Face cache): prompts "
                "cannot be encoded"
            )
        else:
            components[name] = tokenizer
    scheduler_folder = _component_config(folder, "scheduler", shipped)
    scheduler = load_scheduler(scheduler_folder)
    return unet, components, scheduler, f"{type(scheduler).__name__} from {scheduler_folder}"
