"""The optimizers ``dp finetune --optimizer`` offers, and the one-line refusal when a library is missing.

- ``adamw``: ``torch.optim.AdamW`` (two float32 moments per weight: 8 bytes per parameter).
- ``adamw8bit``: bitsandbytes' ``bnb.optim.AdamW8bit`` (block-wise 8-bit moments: 2 bytes per parameter,
  about 15.4 GB less than AdamW for the 2.57 B-parameter SDXL UNet). bitsandbytes is optional and not a
  dependency of dpcli: ``pip install bitsandbytes``; its 8-bit optimizers run on CUDA GPUs.
"""

from __future__ import annotations

import importlib

import torch

from dpcli.errors import BadSetting

OPTIMIZERS = ("adamw", "adamw8bit")
# optimizer -> (module, class, pip package)
_LIBRARY = {"adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes")}


def optimizer_class(name: str):
    """The optimizer class for ``name``; a missing library is a BadSetting naming the package to install."""
    if name not in OPTIMIZERS:
        raise BadSetting("optimizer", "{optimizer} must be one of " + ", ".join(OPTIMIZERS), got=name)
    if name == "adamw":
        return torch.optim.AdamW
    module_name, class_name, package = _LIBRARY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BadSetting(
            "optimizer",
            "{optimizer} {choice} needs the {package} package (pip install {package})",
            choice=name,
            package=package,
        ) from None
    return getattr(module, class_name)


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return optimizer_class(name)(parameters, lr=lr, weight_decay=weight_decay)
