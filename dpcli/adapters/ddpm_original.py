"""Convert UNet weights between the original DDPM key layout and diffusers' ``UNet2DModel``.

The original layout is the ``Model`` class of Ho et al.'s DDPM as ported to PyTorch by pesser
(``pytorch_diffusion``) and reused by the DDIM codebase (Jiaming Song): keys such as ``temb.dense.0.weight``,
``down.0.block.0.conv1.weight``, ``mid.attn_1.q.weight`` or ``up.3.upsample.conv.weight``.

Most of the mapping is renaming; two parts are not:

* the attention projections ``q``/``k``/``v``/``proj_out`` are 1x1 convolutions (weights ``[o, i, 1, 1]``)
  where diffusers has linear layers (``[o, i]``);
* the original ``up`` list is indexed by resolution level like ``down``, so diffusers ``up_blocks[k]``
  is original ``up[num_levels - 1 - k]``.

torch and diffusers are imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from dpcli.errors import BadInput

if TYPE_CHECKING:
    import torch

# Checkpoints of the DDIM codebase were saved from an ``nn.DataParallel`` wrapper.
_DATA_PARALLEL_PREFIX = "module."
_ORIGINAL_MARKER_KEYS = {"temb.dense.0.weight", "down.0.block.0.conv1.weight"}

# The values diffusers' google/ddpm-* configs use; the original model hard-codes all of them.
DDPM_CONSTANTS = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-6,
    "time_embedding_type": "positional",
    "add_attention": True,
    "resnet_time_scale_shift": "default",
}
# The original model always uses GroupNorm(32); the group count is not stored in the weights.
_ASSUMED_NORM_NUM_GROUPS = 32
# (block_out_channels, levels with attention) of the released original models -> their image size.
_KNOWN_SAMPLE_SIZES = {
    ((128, 256, 256, 256), (1,)): 32,  # DDPM CIFAR-10
    ((128, 128, 256, 256, 512, 512), (4,)): 256,  # DDPM CelebA-HQ and LSUN 256
    ((128, 256, 256, 256, 512), (2,)): 64,  # DDIM CelebA 64
}
_DEFAULT_SAMPLE_SIZE = 32

# diffusers layer name -> original layer name, for the layers outside the down/mid/up blocks.
_TOP_LEVEL_LAYERS = {
    "conv_in": "conv_in",
    "time_embedding.linear_1": "temb.dense.0",
    "time_embedding.linear_2": "temb.dense.1",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}
# Inside a resnet or attention block: diffusers sublayer name -> original sublayer name.
_SUBLAYERS = {
    "resnets": {
        "norm1": "norm1",
        "conv1": "conv1",
        "time_emb_proj": "temb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "conv_shortcut": "nin_shortcut",
    },
    "attentions": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"},
}
_ORIGINAL_BLOCK_LISTS = {"resnets": "block", "attentions": "attn"}
_ORIGINAL_MID_BLOCK_PARTS = {
    ("resnets", "0"): "block_1",
    ("attentions", "0"): "attn_1",
    ("resnets", "1"): "block_2",
}
# Linear layers in diffusers, 1x1 convolutions in the original.
_ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")

_LEVEL_BLOCK_LAYER = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_RESAMPLER_LAYER = re.compile(r"(down|up)_blocks\.(\d+)\.\1samplers\.0\.conv")
_MID_BLOCK_LAYER = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


class _TensorPlace(NamedTuple):
    """Where one tensor lives in each layout, and its shape there."""

    original_key: str
    diffusers_key: str
    original_shape: tuple[int, ...]
    diffusers_shape: tuple[int, ...]


def is_original_ddpm_state_dict(keys: Iterable[str]) -> bool:
    """True when state dict ``keys`` (``module.``-prefixed or not) follow the original DDPM layout."""
    return bool(_ORIGINAL_MARKER_KEYS & set(_strip_data_parallel_prefix(list(keys))))


def infer_original_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Infer a diffusers ``UNet2DModel`` config from the tensor shapes of an original DDPM state dict.

    Returns the config and human-readable notes naming the values that are assumed rather than inferred.
    """
    state_dict = _without_data_parallel_prefix(state_dict)
    if not is_original_ddpm_state_dict(state_dict):
        raise BadInput(
            "not an original DDPM state dict: no temb.dense.0.weight or down.0.block.0.conv1.weight"
        )
    num_levels = _count(state_dict, "down")
    layers_per_block = _count(state_dict, "down.0.block")
    block_out_channels = [
        _shape(state_dict, f"down.{level}.block.0.conv1.weight")[0] for level in range(num_levels)
    ]
    conv_in_shape = _shape(state_dict, "conv_in.weight")
    if conv_in_shape[0] != block_out_channels[0]:
        raise BadInput(
            f"conv_in has {conv_in_shape[0]} output channels but down.0 has {block_out_channels[0]}: "
            "an original model with ch_mult[0] != 1 has no UNet2DModel equivalent"
        )
    attention_levels = tuple(
        level for level in range(num_levels) if f"down.{level}.attn.0.q.weight" in state_dict
    )

    notes = []
    sample_size = _KNOWN_SAMPLE_SIZES.get((tuple(block_out_channels), attention_levels))
    if sample_size is None:
        sample_size = _DEFAULT_SAMPLE_SIZE
        notes.append(
            f"sample_size={sample_size} is ASSUMED: the image size is not stored in the weights "
            "and the channels match no known original model"
        )
    notes.append(
        f"norm_num_groups={_ASSUMED_NORM_NUM_GROUPS} is ASSUMED: the group count is not stored in the "
        "weights (the original DDPM uses 32)"
    )
    config = {
        "sample_size": sample_size,
        "in_channels": conv_in_shape[1],
        "out_channels": _shape(state_dict, "conv_out.weight")[0],
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "down_block_types": [
            "AttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(num_levels)
        ],
        "up_block_types": [
            "AttnUpBlock2D" if level in attention_levels else "UpBlock2D"
            for level in reversed(range(num_levels))
        ],
        "norm_num_groups": _ASSUMED_NORM_NUM_GROUPS,
        **DDPM_CONSTANTS,
    }
    return config, notes


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Convert an original DDPM state dict (optionally ``module.``-prefixed) to ``UNet2DModel`` keys.

    The result loads with ``UNet2DModel.from_config(config).load_state_dict(result, strict=True)``; its
    tensors are views of the input's, which is left untouched.
    """
    plan = {
        place.original_key: (place.diffusers_key, place.original_shape, place.diffusers_shape)
        for place in _tensor_places(config)
    }
    return _move_tensors(_without_data_parallel_prefix(state_dict), plan, "original DDPM")


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Convert a ``UNet2DModel`` state dict for ``config`` to the original layout (views; input untouched)."""
    plan = {
        place.diffusers_key: (place.original_key, place.diffusers_shape, place.original_shape)
        for place in _tensor_places(config)
    }
    return _move_tensors(state_dict, plan, "diffusers")


def _tensor_places(config: Mapping) -> list[_TensorPlace]:
    """Both names and shapes of every tensor of the ``UNet2DModel`` that ``config`` describes."""
    import torch
    from diffusers import UNet2DModel

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = UNet2DModel.from_config(config)
    except ValueError as error:
        raise BadInput(f"cannot build a UNet2DModel from the config: {error}") from error
    num_levels = len(config["block_out_channels"])
    places = []
    for diffusers_key, tensor in model.state_dict().items():
        layer, parameter = diffusers_key.rsplit(".", 1)
        original_layer = _original_layer_name(layer, num_levels)
        if original_layer is None:
            raise BadInput(f"the config has a layer the original DDPM model lacks: {layer}")
        diffusers_shape = tuple(tensor.shape)
        is_projection_weight = parameter == "weight" and layer.endswith(_ATTENTION_PROJECTIONS)
        original_shape = diffusers_shape + (1, 1) if is_projection_weight else diffusers_shape
        places.append(
            _TensorPlace(f"{original_layer}.{parameter}", diffusers_key, original_shape, diffusers_shape)
        )
    return places


def _original_layer_name(layer: str, num_levels: int) -> str | None:
    """The original name of a diffusers layer (a key without ``.weight``/``.bias``), None if it has none."""
    if layer in _TOP_LEVEL_LAYERS:
        return _TOP_LEVEL_LAYERS[layer]
    if match := _MID_BLOCK_LAYER.fullmatch(layer):
        kind, index, sublayer = match.groups()
        if (kind, index) not in _ORIGINAL_MID_BLOCK_PARTS or sublayer not in _SUBLAYERS[kind]:
            return None
        return f"mid.{_ORIGINAL_MID_BLOCK_PARTS[kind, index]}.{_SUBLAYERS[kind][sublayer]}"
    if match := _LEVEL_BLOCK_LAYER.fullmatch(layer):
        side, block, kind, index, sublayer = match.groups()
        if sublayer not in _SUBLAYERS[kind]:
            return None
        level = _original_level(side, int(block), num_levels)
        return f"{side}.{level}.{_ORIGINAL_BLOCK_LISTS[kind]}.{index}.{_SUBLAYERS[kind][sublayer]}"
    if match := _RESAMPLER_LAYER.fullmatch(layer):
        side, block = match.groups()
        return f"{side}.{_original_level(side, int(block), num_levels)}.{side}sample.conv"
    return None


def _original_level(side: str, block: int, num_levels: int) -> int:
    """The original index of diffusers ``{side}_blocks[block]``; original ``up`` counts resolution levels."""
    return block if side == "down" else num_levels - 1 - block


def _move_tensors(
    state_dict: Mapping[str, torch.Tensor], plan: dict[str, tuple[str, tuple, tuple]], layout: str
) -> dict[str, torch.Tensor]:
    """Rename and reshape tensors as ``plan`` says: source key -> (target key, source shape, target shape)."""
    missing = [key for key in plan if key not in state_dict]
    unexpected = [key for key in state_dict if key not in plan]
    if missing or unexpected:
        problems = [
            f"{label} {_preview(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise BadInput(f"the {layout} state dict does not fit the UNet2DModel config: {'; '.join(problems)}")
    wrong_shapes = [
        f"{key} is {tuple(state_dict[key].shape)}, expected {source_shape}"
        for key, (_, source_shape, _) in plan.items()
        if tuple(state_dict[key].shape) != source_shape
    ]
    if wrong_shapes:
        raise BadInput(
            f"the {layout} state dict does not fit the UNet2DModel config: {_preview(wrong_shapes)}"
        )
    return {
        target_key: state_dict[source_key].reshape(target_shape)
        for source_key, (target_key, _, target_shape) in plan.items()
    }


def _preview(items: list[str], limit: int = 3) -> str:
    """A short one-line listing: the count and the first few items."""
    shown = ", ".join(items[:limit])
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} ({shown}{more})"


def _strip_data_parallel_prefix(keys: list[str]) -> list[str]:
    """``keys`` without the ``module.`` that ``nn.DataParallel`` puts in front of every key."""
    if keys and all(key.startswith(_DATA_PARALLEL_PREFIX) for key in keys):
        return [key[len(_DATA_PARALLEL_PREFIX) :] for key in keys]
    return keys


def _without_data_parallel_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under keys without the ``module.`` prefix of ``nn.DataParallel``."""
    return dict(zip(_strip_data_parallel_prefix(list(state_dict)), state_dict.values(), strict=True))


def _count(state_dict: Mapping[str, torch.Tensor], list_name: str) -> int:
    """The length of the module list ``list_name``: one more than the largest N of ``{list_name}.N`` keys."""
    pattern = re.compile(re.escape(list_name) + r"\.(\d+)\.")
    indices = {int(match[1]) for key in state_dict if (match := pattern.match(key))}
    if not indices:
        raise BadInput(f"the original DDPM state dict has no {list_name}.N keys")
    return 1 + max(indices)


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of a tensor that an original DDPM state dict must have."""
    if key not in state_dict:
        raise BadInput(f"the original DDPM state dict has no {key}")
    return tuple(state_dict[key].shape)
