"""Single-file CompVis latent-diffusion / Stable Diffusion checkpoints, to diffusers components.

A CompVis checkpoint holds the whole ``LatentDiffusion`` module: ``model.diffusion_model.*`` (the UNet),
``first_stage_model.*`` (the KL or VQ autoencoder) and ``cond_stage_model.*`` (CLIP / OpenCLIP text encoder,
or the class embedder of class-conditional LDMs); its architecture is in the ``config.yaml`` it was
trained with. CompVis → diffusers uses diffusers' own single-file conversion
(``diffusers.loaders.single_file_utils``) for the UNet, the KL autoencoder and the text encoders. Written
here is what diffusers lacks: the VQ autoencoder (codebook), the class embedder, text-encoder configs
inferred from weight shapes (diffusers fetches them from the Hub) and the scheduler from the YAML. The
reverse direction (diffusers → CompVis), which only the tests need to make checkpoints and check the
mapping both ways, is in ``tests/helpers/compvis.py``.

Everything heavy is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpcli.errors import BadInput, BadSetting

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
CONFIG_NAMES = ("config.yaml", "config.yml")


def is_compvis_state_dict(keys: Iterable[str]) -> bool:
    """Whether a checkpoint holds a CompVis ``LatentDiffusion`` model (its UNet under ``model.diffusion_model``)."""
    return any(key.startswith(UNET_PREFIX) for key in keys)


# Reading the YAML -------------------------------------------------------------------------------------
def find_original_config(checkpoint: Path, config: Path | None) -> Path:
    """The training YAML: ``--config``, else ``config.yaml`` or ``<checkpoint stem>.yaml`` beside the file."""
    if config is not None:
        return Path(config)
    folder = Path(checkpoint).parent
    for candidate in (*(folder / name for name in CONFIG_NAMES), Path(checkpoint).with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    raise BadSetting(
        "config",
        "{checkpoint} is a CompVis/Stable Diffusion checkpoint; its architecture is in the YAML it was trained "
        "with: put it beside the file as config.yaml or pass {config} FILE.yaml",
        checkpoint=checkpoint,
    )


def read_original_config(path: Path) -> dict:
    import yaml

    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in CONFIG_NAMES if (path / n).is_file()), path / CONFIG_NAMES[0])
    try:
        original = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BadInput(f"{path} is not a readable YAML config: {str(exc).splitlines()[0]}") from None
    params = (original or {}).get("model", {}).get("params") if isinstance(original, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise BadInput(
            f"{path} is not a CompVis latent-diffusion config (expected model.params.unet_config and "
            "model.params.first_stage_config)"
        )
    return original


def _model_params(original: Mapping) -> dict:
    return original["model"]["params"]


def latent_size(original: Mapping) -> int:
    params = _model_params(original)
    size = params.get("image_size") or params["unet_config"]["params"].get("image_size") or 64
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def conditioning_kind(original: Mapping) -> str:
    """``none``, ``clip`` (SD 1.x), ``open_clip`` (SD 2.x) or ``class`` (class embedder as cross-attention)."""
    cond = _model_params(original).get("cond_stage_config")
    target = cond.get("target", "") if isinstance(cond, dict) else str(cond or "")
    if not target or target == "__is_unconditional__":
        return "none"
    name = target.rsplit(".", 1)[-1]
    kinds = {"FrozenCLIPEmbedder": "clip", "FrozenOpenCLIPEmbedder": "open_clip", "ClassEmbedder": "class"}
    if name not in kinds:
        raise BadInput(
            f"cond_stage_config {target} is not supported (supported: FrozenCLIPEmbedder, "
            "FrozenOpenCLIPEmbedder, ClassEmbedder, unconditional)"
        )
    return kinds[name]


# CompVis -> diffusers -------------------------------------------------------------------------------
def unet_from_compvis(
    checkpoint: Mapping[str, torch.Tensor], original: Mapping
) -> tuple[dict, dict, list[str]]:
    """(UNet2DConditionModel config, diffusers state dict, notes), via diffusers' conversion."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    unet_params = _model_params(original)["unet_config"]["params"]
    if not unet_params.get("use_spatial_transformer", True) and unet_params.get("attention_resolutions"):
        raise BadInput(
            "CompVis UNets with the legacy attention blocks (use_spatial_transformer: false, e.g. the "
            "celebahq/lsun LDMs) are not supported as single files; use their diffusers conversion "
            "(e.g. CompVis/ldm-celebahq-256) instead"
        )
    if unet_params.get("num_classes") == "sequential" or unet_params.get("adm_in_channels"):
        raise BadInput("SDXL-style UNets (adm_in_channels / sequential class input) are not supported yet")
    patched = {
        "model": {
            "params": {
                **_model_params(original),
                "unet_config": {
                    "params": {
                        "transformer_depth": 1,
                        "context_dim": None,
                        "attention_resolutions": [],
                        **unet_params,
                    }
                },
            }
        }
    }
    try:
        config = create_unet_diffusers_config_from_ldm(patched, checkpoint)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(
            f"cannot build a UNet config from the YAML's unet_config: missing or bad {exc}"
        ) from None
    config = {"_class_name": "UNet2DConditionModel", **config, "sample_size": latent_size(original)}
    notes = []
    ema_keys = sum(key.startswith("model_ema.") for key in checkpoint)
    if ema_keys > 100:
        notes.append("the checkpoint holds EMA weights: the UNet uses them (as for sampling)")
    state_dict = convert_ldm_unet_checkpoint(dict(checkpoint), config, extract_ema=ema_keys > 100)
    return config, state_dict, notes


def vae_from_compvis(checkpoint: Mapping[str, torch.Tensor], original: Mapping) -> tuple[str, dict, dict]:
    """(diffusers class name, config, state dict) of the first stage: ``AutoencoderKL`` or ``VQModel``."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    params = _model_params(original)
    first_stage = params["first_stage_config"]
    target = str(first_stage.get("target", ""))
    stage_params = first_stage.get("params", {})
    ddconfig = stage_params.get("ddconfig")
    if not isinstance(ddconfig, dict):
        raise BadInput("first_stage_config has no params.ddconfig")
    if ddconfig.get("attn_resolutions"):
        raise BadInput(
            "autoencoders with attention inside the down/up blocks (attn_resolutions) are not supported"
        )
    is_vq = "VQ" in target.rsplit(".", 1)[-1]
    widths = [int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]]
    config: dict[str, Any] = {
        "in_channels": int(ddconfig.get("in_channels", 3)),
        "out_channels": int(ddconfig.get("out_ch", 3)),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "latent_channels": int(ddconfig["z_channels"]),
        "sample_size": latent_size(original) * 2 ** (len(widths) - 1),
        # LatentDiffusion's default; every Stable Diffusion YAML sets 0.18215 explicitly.
        "scaling_factor": float(params.get("scale_factor", 1.0)),
    }
    if is_vq:
        config.update(
            _class_name="VQModel",
            num_vq_embeddings=int(stage_params["n_embed"]),
            vq_embed_dim=int(stage_params["embed_dim"]),
        )
    else:
        config["_class_name"] = "AutoencoderKL"
    state_dict = convert_ldm_vae_checkpoint(dict(checkpoint), config)
    if is_vq:
        codebook = checkpoint.get(f"{VAE_PREFIX}quantize.embedding.weight")
        if codebook is None:
            raise BadInput("the VQ first stage has no codebook (first_stage_model.quantize.embedding.weight)")
        state_dict["quantize.embedding.weight"] = codebook
    return config["_class_name"], config, state_dict


def text_encoder_config(
    checkpoint: Mapping[str, torch.Tensor], kind: str, original: Mapping
) -> tuple[dict, list[str]]:
    """A CLIPTextConfig (as a dict) from weight shapes; heads assume 64-wide heads (true for SD 1.x/2.x)."""
    if kind == "clip":
        base = f"{CLIP_PREFIX}text_model."
        tokens = checkpoint[f"{base}embeddings.token_embedding.weight"]
        positions = checkpoint[f"{base}embeddings.position_embedding.weight"]
        layers = _count(checkpoint, f"{base}encoder.layers.")
        intermediate = checkpoint[f"{base}encoder.layers.0.mlp.fc1.weight"].shape[0]
        activation = "quick_gelu"
    else:
        tokens = checkpoint[f"{OPEN_CLIP_PREFIX}token_embedding.weight"]
        positions = checkpoint[f"{OPEN_CLIP_PREFIX}positional_embedding"]
        layers = _count(checkpoint, f"{OPEN_CLIP_PREFIX}transformer.resblocks.") - _dropped_layers(original)
        intermediate = checkpoint[f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        activation = "gelu"
    vocab, hidden = (int(v) for v in tokens.shape)
    heads = max(1, hidden // 64)
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": int(positions.shape[0]),
        "hidden_act": activation,
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        # CLIP's <|startoftext|> and <|endoftext|> are the last two tokens of its vocabulary.
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }
    note = f"text encoder config inferred from weight shapes ({layers} layers, {heads} heads of 64)"
    return config, [note]


def text_encoder_from_compvis(
    checkpoint: Mapping[str, torch.Tensor], kind: str, original: Mapping, hidden_size: int
) -> dict:
    """The CLIPTextModel state dict of the text encoder (``text_model.*`` names), via diffusers' conversion."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if kind == "clip":
        return convert_ldm_clip_checkpoint(dict(checkpoint))
    dropped = _dropped_layers(original)
    layers = _count(checkpoint, f"{OPEN_CLIP_PREFIX}transformer.resblocks.")
    last = {f"{OPEN_CLIP_PREFIX}transformer.resblocks.{i}." for i in range(layers - dropped, layers)}
    kept = {k: v for k, v in checkpoint.items() if not any(k.startswith(p) for p in last)}
    # diffusers reads only config.hidden_size from the model it is given (when there is no text_projection).
    shape_only = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))
    return convert_open_clip_checkpoint(shape_only, kept, prefix=OPEN_CLIP_PREFIX)


def class_embedder_from_compvis(checkpoint: Mapping[str, torch.Tensor]) -> torch.Tensor:
    weight = checkpoint.get(f"{COND_PREFIX}embedding.weight")
    if weight is None:
        raise BadInput("the class-conditional checkpoint has no cond_stage_model.embedding.weight")
    return weight


def tokenizer_candidates(kind: str, original: Mapping) -> list[tuple[str, str | None]]:
    """Hub repos (and sub-folders) whose cached tokenizer fits the text encoder, most specific first."""
    if kind == "clip":
        cond = _model_params(original).get("cond_stage_config", {})
        version = (cond.get("params") or {}).get("version") or "openai/clip-vit-large-patch14"
        return [(str(version), None)]
    return [
        ("stabilityai/stable-diffusion-2-1", "tokenizer"),
        ("stabilityai/stable-diffusion-2", "tokenizer"),
    ]


def scheduler_config(original: Mapping) -> dict:
    """A DDIMScheduler config with the training noise schedule and parameterisation of the YAML."""
    params = _model_params(original)
    schedules = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
    schedule = params.get("beta_schedule", "linear")
    if schedule not in schedules:
        raise BadInput(f"beta_schedule {schedule!r} is not supported (supported: {', '.join(schedules)})")
    predictions = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
    parameterization = params.get("parameterization", "eps")
    if parameterization not in predictions:
        raise BadInput(f"parameterization {parameterization!r} is not supported (supported: eps, v, x0)")
    return {
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 1e-4)),
        "beta_end": float(params.get("linear_end", 2e-2)),
        "beta_schedule": schedules[schedule],
        "prediction_type": predictions[parameterization],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def _dropped_layers(original: Mapping) -> int:
    """OpenCLIP in SD 2.x uses the penultimate layer: diffusers' text encoder simply has one layer less."""
    cond = _model_params(original).get("cond_stage_config", {})
    return 1 if (cond.get("params") or {}).get("layer", "last") == "penultimate" else 0


def _count(state_dict: Mapping[str, Any], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})
