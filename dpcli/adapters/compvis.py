"""Single-file CompVis latent-diffusion / Stable Diffusion checkpoints, to diffusers components and back.

A CompVis checkpoint holds the whole ``LatentDiffusion`` module: ``model.diffusion_model.*`` (the UNet),
``first_stage_model.*`` (the KL or VQ autoencoder) and ``cond_stage_model.*`` (CLIP / OpenCLIP text encoder,
or the class embedder of class-conditional LDMs); its architecture is in the ``config.yaml`` it was
trained with. CompVis → diffusers uses diffusers' own single-file conversion
(``diffusers.loaders.single_file_utils``) for the UNet, the KL autoencoder and the text encoders. Written
here is what diffusers lacks: the VQ autoencoder (codebook), the class embedder, text-encoder configs
inferred from weight shapes (diffusers fetches them from the Hub), the scheduler from the YAML, and the
reverse direction diffusers → CompVis, so the mapping is checked both ways.

Everything heavy is imported inside the functions.
"""

from __future__ import annotations

import re
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
# diffusers UNet resnet sub-layer -> CompVis ResBlock sub-layer.
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding": "label_emb",
}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


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


# diffusers -> CompVis ---------------------------------------------------------------------------------
def unet_to_compvis(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights under CompVis ``openaimodel.UNetModel`` names (prefixed)."""
    per_block = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    up_has_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    out = {}
    for key, tensor in state_dict.items():
        out[UNET_PREFIX + _unet_key_to_compvis(key, per_block, levels, up_has_attention)] = tensor
    return out


def _unet_key_to_compvis(key: str, per_block: int, levels: int, up_has_attention: list[bool]) -> str:
    for diffusers_name, compvis_name in _UNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return compvis_name + key[len(diffusers_name) :]
    match = re.match(
        r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key
    )
    if match:
        side, block, part, layer, rest = match.groups()
        block, layer = int(block), int(layer)
        if side == "down_blocks":
            if part == "downsamplers":
                return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{rest.removeprefix('conv.')}"
            index = 1 + block * (per_block + 1) + layer
            slot = 0 if part == "resnets" else 1
            prefix = f"input_blocks.{index}.{slot}"
        else:
            if part == "upsamplers":
                slot = 2 if up_has_attention[block] else 1
                return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.{rest}"
            index = block * (per_block + 1) + layer
            prefix = f"output_blocks.{index}.{0 if part == 'resnets' else 1}"
        return f"{prefix}.{_resnet_part(rest) if part == 'resnets' else rest}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if match:
        part, layer, rest = match.groups()
        index = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[part][layer]
        return f"middle_block.{index}.{_resnet_part(rest) if part == 'resnets' else rest}"
    raise BadInput(f"no CompVis name for UNet weight {key}")


def _resnet_part(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET_PARTS.get(name, name)}.{tail}"


def vae_to_compvis(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """AutoencoderKL / VQModel weights under CompVis (taming) names, prefixed; attention as 1x1 convs."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, tensor in state_dict.items():
        name = key
        name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name
        )
        name = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: (
                f"decoder.up.{levels - 1 - int(m.group(1))}."
                + ("block." if m.group(2) == "resnets" else "upsample.")
            ),
            name,
        )
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", name)
        attention = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name)
        if attention:
            coder, part, kind = attention.groups()
            name = f"{coder}.mid.attn_1.{_VAE_ATTENTION_PARTS[part]}.{kind}"
            if kind == "weight" and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
        name = name.replace("conv_shortcut", "nin_shortcut")
        out[VAE_PREFIX + name] = tensor
    return out


def clip_to_compvis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under ``cond_stage_model.transformer.text_model.*`` (SD 1.x)."""
    return {
        CLIP_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}"): tensor
        for key, tensor in state_dict.items()
    }


def open_clip_to_compvis(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under OpenCLIP names (``cond_stage_model.model.*``, SD 2.x); q/k/v fused."""
    import torch

    flat = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    out = {}
    renames = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, tensor in flat.items():
        if key in renames:
            out[renames[key]] = tensor
            continue
        match = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not match:
            continue  # buffers such as position_ids
        layer, part, kind = match.groups()
        base = f"transformer.resblocks.{layer}."
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if part.endswith("q_proj"):
                prefix = f"encoder.layers.{layer}.self_attn."
                fused = [flat[f"{prefix}{p}_proj.{kind}"] for p in "qkv"]
                out[f"{base}attn.in_proj_{kind}"] = torch.cat(fused, 0)
            continue
        name = "attn.out_proj" if part == "self_attn.out_proj" else parts[part]
        out[f"{base}{name}.{kind}"] = tensor
    hidden = out["token_embedding.weight"].shape[1]
    out["text_projection"] = torch.eye(hidden)
    return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in out.items()}
