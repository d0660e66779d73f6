"""Files of diffusers models: configs, weights folders (single or sharded) and schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli.errors import BadInput
from dpcli.io.files import read_json
from dpcli.io.weights import load_tensor_file

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
DEFAULT_SCHEDULER_NOTE = "diffusers DDPMScheduler defaults (1000 steps, linear betas 1e-4..0.02)"


def read_config_file(path: Path) -> dict:
    """A diffusers config from a JSON file or a folder holding config.json (or unet/config.json)."""
    path = Path(path)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return read_json(candidate)
    raise BadInput(f"no config.json found at {path}")


def check_weights_fit(model: torch.nn.Module, state_dict: dict, origin: str) -> None:
    """Any missing, unexpected or mis-shaped tensor in ``state_dict`` is a clear BadInput."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise BadInput(f"weights in {origin} do not fit the model config: {', '.join(parts)}")


def load_weights_into(model: torch.nn.Module, state_dict: dict, origin: str) -> None:
    """Strictly load ``state_dict``; any missing, unexpected or mis-shaped tensor is a clear BadInput."""
    check_weights_fit(model, state_dict, origin)
    model.load_state_dict(state_dict, strict=True)


def folder_weights(folder: Path, names: tuple[str, ...] = WEIGHT_NAMES) -> dict[str, torch.Tensor]:
    """The weights of a model folder: the first of ``names`` found as a sharded index (``NAME.index.json``),
    else as a single file; safetensors first in the default diffusers ``names``."""
    for name in names:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(load_tensor_file(folder / shard))
            return merged
    for name in names:
        if (folder / name).is_file():
            return load_tensor_file(folder / name)
    raise BadInput(f"no weights in {folder} (expected one of {', '.join(names)})")


def load_scheduler(path: Path):
    """A diffusers scheduler from a scheduler_config.json file or a folder holding one."""
    import diffusers

    path = Path(path)
    file = path if path.is_file() else path / "scheduler_config.json"
    if not file.is_file() and (path / "scheduler" / "scheduler_config.json").is_file():
        file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise BadInput(f"no scheduler_config.json at {path}")
    config = read_json(file)
    class_name = str(config.get("_class_name", "DDPMScheduler"))
    scheduler_class = getattr(diffusers, class_name, None)
    if not class_name.endswith("Scheduler") or scheduler_class is None:
        raise BadInput(f"{file}: unknown scheduler class {class_name!r}")
    return scheduler_class.from_config(config)


def default_scheduler():
    """diffusers' ``DDPMScheduler`` defaults: what a bare UNet folder or single file gets."""
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def unet_class_of(folder: Path) -> str | None:
    """The ``_class_name`` in a model folder's config.json, or None when absent or unreadable."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("_class_name")
    except ValueError:
        return None
