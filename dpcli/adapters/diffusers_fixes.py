"""What torch-pruning needs to know about diffusers modules, and the attributes it leaves stale.

After channels are removed, diffusers modules keep derived attributes that their forward code uses:
``Upsample2D/Downsample2D.channels/.out_channels`` (forward asserts on them) and
``Attention.heads/inner_dim/inner_kv_dim/query_dim/out_dim/scale`` (the classic processor uses
``scale``; SDPA derives it from the head width, so we keep both in agreement).
"""

from __future__ import annotations

import torch


def attention_modules(model: torch.nn.Module):
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]


def pruning_options(model: torch.nn.Module) -> dict:
    """``num_heads`` for every q/k/v projection and GEGLU projections paired (``out_channel_groups`` 2)."""
    from diffusers.models.activations import GEGLU

    num_heads: dict[torch.nn.Module, int] = {}
    for _, attention in attention_modules(model):
        for projection in (attention.to_q, attention.to_k, attention.to_v):
            if projection is not None:
                num_heads[projection] = int(attention.heads)
    groups = {m.proj: 2 for m in model.modules() if isinstance(m, GEGLU)}
    return {"num_heads": num_heads, "out_channel_groups": groups}


def fix_attributes(model: torch.nn.Module, heads: dict[str, int] | None = None) -> None:
    """Bring derived attributes in line with the (pruned) weights. ``heads`` maps attention names to heads."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for _, module in model.named_modules():
        if isinstance(module, (Upsample2D, Downsample2D)):
            conv = getattr(module, "conv", None)
            if isinstance(conv, torch.nn.Conv2d):
                module.channels = conv.in_channels
                module.out_channels = conv.out_channels
    for name, attention in attention_modules(model):
        if heads and name in heads:
            attention.heads = int(heads[name])
        attention.inner_dim = attention.to_q.out_features
        attention.inner_kv_dim = (
            attention.to_k.out_features if attention.to_k is not None else attention.inner_dim
        )
        attention.query_dim = attention.to_q.in_features
        attention.out_dim = attention.to_out[0].out_features
        if attention.inner_dim % attention.heads:
            raise ValueError(
                f"{name}: inner width {attention.inner_dim} does not divide into {attention.heads} heads"
            )
        if getattr(attention, "scale_qk", True):
            attention.scale = (attention.inner_dim // attention.heads) ** -0.5


def heads_after_pruning(model: torch.nn.Module, pruner) -> dict[str, int]:
    """Heads per attention module as the pruner left them (head pruning changes ``pruner.num_heads``)."""
    result = {}
    for name, attention in attention_modules(model):
        result[name] = int(pruner.num_heads.get(attention.to_q, attention.heads))
    return result
