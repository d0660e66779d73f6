"""CompVis / Stable Diffusion single files for tests: the diffusers -> CompVis weight mapping (the reverse of
``dpcli.adapters.compvis``, which only reads them) and checkpoints made from the tiny latent models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from dpcli.adapters.compvis import CLIP_PREFIX, COND_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from dpcli.errors import BadInput
from helpers.latent import (
    CROSS_WIDTH,
    byte_level_tokenizer,
    cross_attention_unet,
    kl_autoencoder,
    text_encoder,
    vq_autoencoder,
)

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


# CompVis single files ---------------------------------------------------------------------------------
def compvis_yaml(kind: str, unet_config: dict, vae_config: dict, vq: bool = False, **params) -> str:
    """The training YAML of a CompVis LatentDiffusion model with the tiny models' architecture."""
    import yaml

    widths = list(unet_config["block_out_channels"])
    attention = [2**i for i, name in enumerate(unet_config["down_block_types"]) if "CrossAttn" in name]
    unet = {
        "image_size": unet_config["sample_size"],
        "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"],
        "model_channels": widths[0],
        "attention_resolutions": attention,
        "num_res_blocks": unet_config["layers_per_block"],
        "channel_mult": [w // widths[0] for w in widths],
        "num_heads": unet_config["attention_head_dim"],
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": unet_config["cross_attention_dim"],
        "legacy": False,
    }
    vae_widths = list(vae_config["block_out_channels"])
    ddconfig = {
        "double_z": not vq,
        "z_channels": vae_config["latent_channels"],
        "resolution": 16,
        "in_channels": 3,
        "out_ch": 3,
        "ch": vae_widths[0],
        "ch_mult": [w // vae_widths[0] for w in vae_widths],
        "num_res_blocks": vae_config["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    first_stage = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "ddconfig": ddconfig},
    }
    if vq:
        first_stage = {
            "target": "ldm.models.autoencoder.VQModelInterface",
            "params": {
                "embed_dim": vae_config["vq_embed_dim"],
                "n_embed": vae_config["num_vq_embeddings"],
                "ddconfig": ddconfig,
            },
        }
    targets = {
        "clip": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
        "open_clip": {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        },
        "class": {
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"n_classes": 5, "embed_dim": 64},
        },
    }
    model = {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "timesteps": 1000,
            "image_size": unet_config["sample_size"],
            "channels": unet_config["in_channels"],
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": first_stage,
            "cond_stage_config": targets[kind],
            **params,
        },
    }
    return yaml.safe_dump({"model": model})


def compvis_checkpoint(folder: Path, kind: str, suffix: str = ".ckpt", **params):
    """A CompVis-layout checkpoint (+ config.yaml, + tokenizer/) made from tiny diffusers models."""
    folder.mkdir(parents=True, exist_ok=True)
    vq = kind == "class"
    channels = 3 if vq else 4
    unet = cross_attention_unet(
        groups=32, in_channels=channels, out_channels=channels
    )  # CompVis: GroupNorm(32)
    vae = vq_autoencoder(groups=32, widths=(32, 64)) if vq else kl_autoencoder(groups=32, widths=(32, 64))
    state = {
        **unet_to_compvis(unet.state_dict(), unet.config),
        **vae_to_compvis(vae.state_dict(), vae.config),
    }
    parts = {"unet": unet, "vae": vae}
    if kind in ("clip", "open_clip"):
        tokenizer = byte_level_tokenizer(folder / "tokenizer-files")
        tokenizer.save_pretrained(folder / "tokenizer")
        layers = 2
        text = text_encoder(len(tokenizer), act="quick_gelu" if kind == "clip" else "gelu", layers=layers)
        parts["text_encoder"] = text
        if kind == "clip":
            state.update(clip_to_compvis(text.state_dict()))
        else:
            weights = open_clip_to_compvis(text.state_dict())
            prefix = f"{OPEN_CLIP_PREFIX}transformer.resblocks."
            # SD 2.x runs OpenCLIP up to its penultimate layer: the file holds one layer more.
            weights.update({k.replace(f"{prefix}{layers - 1}.", f"{prefix}{layers}."): v.clone() + 1
                            for k, v in weights.items() if k.startswith(f"{prefix}{layers - 1}.")})  # fmt: skip
            state.update(weights)
    if kind == "class":
        torch.manual_seed(1)
        table = torch.nn.Embedding(5, CROSS_WIDTH)
        parts["class_embedder"] = table
        state[f"{COND_PREFIX}embedding.weight"] = table.weight.detach().clone()
    vae_config = dict(vae.config)
    (folder / "config.yaml").write_text(
        compvis_yaml(
            kind, dict(unet.config), vae_config, vq=vq, scale_factor=0.18215 if not vq else 1.0, **params
        )
    )
    path = folder / f"model{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 10}, path)  # the Lightning checkpoint layout
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, parts
