"""Recognising latent diffusion models: pipelines, dpcli folders, UNet2DConditionModel folders, CompVis files."""

from __future__ import annotations

import json

from dpcli.adapters.base import ModelSource

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")
AUTOENCODER_KEYS = ("vae", "vqvae")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLASS_EMBEDDER_FILE = "model.safetensors"


def detect_latent(source: ModelSource) -> float:
    """How likely ``source`` is a latent diffusion model (pipeline, dpcli folder, UNet2DConditionModel, CompVis)."""
    if source.kind == "builtin":
        from dpcli.adapters.unet2d import builtin_config_names

        prefix, _, name = source.spec.partition(":")
        return 1.0 if prefix == "config" and name in builtin_config_names("UNet2DConditionModel") else 0.0
    if source.path is None:
        return 0.0
    if source.kind in ("folder", "hub"):
        from dpcli.io.model_format import read_metadata

        saved = read_metadata(source.path)
        if saved is not None:
            return 1.0 if saved.get("adapter") == "ldm" else 0.0
        index = source.read_json("model_index.json")
        if index is not None:
            unet = (index.get("unet") or [None, None])[-1]
            if unet not in UNET_CLASSES:
                return 0.0
            if any(key in index for key in AUTOENCODER_KEYS):
                return 0.9
            return 0.5 if unet == "UNet2DConditionModel" else 0.0
        config = source.read_json("config.json")
        return 0.6 if config and config.get("_class_name") == "UNet2DConditionModel" else 0.0
    if source.suffix == ".json":
        try:
            return (
                0.6
                if json.loads(source.path.read_text()).get("_class_name") == "UNet2DConditionModel"
                else 0.0
            )
        except (ValueError, AttributeError):
            return 0.0
    if source.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        from dpcli.adapters.compvis import is_compvis_state_dict

        return 0.9 if is_compvis_state_dict(source.state_dict()) else 0.0
    return 0.0
