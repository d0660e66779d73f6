"""Loading and running diffusers ``UNet2DModel`` denoisers (the ``ddpm`` adapter's machinery)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli._deprecated import moved_names
from dpcli.adapters.base import LoadedModel, ModelSource
from dpcli.errors import BadInput, BadSetting
from dpcli.io import diffusers_files, model_format

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
CONFIGS = RESOURCES / "configs"
# Generic diffusers file helpers that lived here before dpcli.io; docs/plugins.md promised them.
__getattr__ = moved_names(
    __name__,
    {
        name: "dpcli.io.diffusers_files"
        for name in ("folder_weights", "load_weights_into", "load_scheduler", "default_scheduler")
    },
)


def builtin_config_names(class_name: str | None = "UNet2DModel") -> list[str]:
    """Names of the shipped configs (``config:NAME``) describing a ``class_name`` (None: all of them)."""
    return sorted(
        p.stem
        for p in CONFIGS.glob("*.json")
        if class_name is None or json.loads(p.read_text()).get("_class_name", "UNet2DModel") == class_name
    )


def builtin_model_names() -> list[str]:
    """Trained models shipped in the package (dpcli format folders under resources/)."""
    return sorted(p.parent.name for p in RESOURCES.glob("*/dpcli.json"))


def _builtin_name(source: ModelSource) -> tuple[str, str]:
    """('builtin' or 'config', NAME) of a ``builtin:NAME`` / ``config:NAME`` source."""
    prefix, name = source.spec.split(":", 1)
    return prefix, name


def build_unet(config: dict, seed: int | None = 0):
    """A UNet2DModel from a diffusers config dict (random weights, seeded for reproducibility)."""
    from diffusers import UNet2DModel

    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise BadInput(f"config describes a {config.get('_class_name')}, not a UNet2DModel")
    from dpcli.sizing import check_buildable

    with torch.random.fork_rng(devices=[]):
        try:
            check_buildable(lambda: UNet2DModel.from_config(config), "the UNet2DModel of this config")
            if seed is not None:
                torch.manual_seed(seed)
            return UNet2DModel.from_config(config).eval()
        except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            raise BadInput(f"invalid UNet2DModel config: {str(exc).splitlines()[0]}") from None


def _unet_keys(keys) -> bool:
    keys = set(keys)
    return (
        "conv_in.weight" in keys
        and any(k.startswith("down_blocks.") for k in keys)
        and not any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)
    )


def detect_unet2d(source: ModelSource) -> float:
    """How likely ``source`` is a plain (pixel-space) UNet2DModel DDPM."""
    if source.kind == "builtin":
        prefix, name = _builtin_name(source)
        names = builtin_model_names() if prefix == "builtin" else builtin_config_names()
        return 1.0 if name in names else 0.0
    if source.path is None:
        return 0.0
    if source.kind in ("folder", "hub"):
        saved = model_format.read_metadata(source.path)
        if saved is not None:
            return 1.0 if saved.get("adapter") == "ddpm" else 0.0
        index = source.read_json("model_index.json")
        if index is not None:
            unet = index.get("unet")
            has_autoencoder = any(k in index for k in ("vqvae", "vae", "vq_vae"))
            return 0.9 if unet and unet[-1] == "UNet2DModel" and not has_autoencoder else 0.0
        return 0.9 if diffusers_files.unet_class_of(source.path) == "UNet2DModel" else 0.0
    if source.suffix == ".json":
        try:
            return 0.8 if json.loads(source.path.read_text()).get("_class_name") == "UNet2DModel" else 0.0
        except (ValueError, AttributeError):
            return 0.0
    if source.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        from dpcli.adapters.ddpm_original import is_original_ddpm_state_dict

        keys = list(source.state_dict())
        return 0.8 if _unet_keys(keys) or is_original_ddpm_state_dict(keys) else 0.0
    return 0.0


def load_unet2d(source: ModelSource, adapter_name: str, config_path: Path | None = None) -> LoadedModel:
    """Load a UNet2DModel (and its scheduler) from any supported source."""
    notes: list[str] = []
    scheduler = None
    scheduler_origin = diffusers_files.DEFAULT_SCHEDULER_NOTE
    source_kind = source.kind

    if source.kind == "builtin" and _builtin_name(source)[0] == "builtin":
        folder = RESOURCES / _builtin_name(source)[1]
        loaded = load_saved_unet2d(ModelSource(spec=source.spec, kind="builtin", path=folder), adapter_name)
        loaded.source_kind = "built-in trained model"
        return loaded
    if source.kind == "builtin":
        name = _builtin_name(source)[1]
        config = diffusers_files.read_config_file(CONFIGS / f"{name}.json")
        model = build_unet(config)
        source_kind = "built-in config, random weights"
        notes.append("architecture only: weights are random (seed 0)")
    elif source.kind in ("folder", "hub") and (source.path / "dpcli.json").is_file():
        return load_saved_unet2d(source, adapter_name)
    elif source.kind in ("folder", "hub"):
        folder = source.path
        if (folder / "model_index.json").is_file():
            folder = folder / "unet"
            scheduler_dir = source.path / "scheduler"
            if (scheduler_dir / "scheduler_config.json").is_file():
                scheduler = diffusers_files.load_scheduler(scheduler_dir)
                scheduler_origin = f"{type(scheduler).__name__} from the pipeline"
            source_kind = "diffusers pipeline" + (" (Hub cache)" if source.kind == "hub" else "")
        else:
            source_kind = "diffusers model folder" + (" (Hub cache)" if source.kind == "hub" else "")
        config = diffusers_files.read_config_file(config_path or folder)
        model = build_unet(config)
        diffusers_files.load_weights_into(model, diffusers_files.folder_weights(folder), str(folder))
    elif source.suffix == ".json":
        config = diffusers_files.read_config_file(source.path)
        model = build_unet(config)
        source_kind = "config file, random weights"
        notes.append("architecture only: weights are random (seed 0)")
    else:
        model, config, source_kind = _load_single_file(source, config_path, notes)

    if scheduler is None:
        scheduler = diffusers_files.default_scheduler()
    return LoadedModel(
        model=model,
        adapter=adapter_name,
        source=source.spec,
        source_kind=source_kind,
        config=dict(model.config),
        sample_size=_sample_size(config),
        in_channels=int(config.get("in_channels", 3)),
        scheduler=scheduler,
        scheduler_origin=scheduler_origin,
        notes=notes,
    )


def _sample_size(config: dict) -> int:
    size = config.get("sample_size") or 32
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _load_single_file(source: ModelSource, config_path: Path | None, notes: list[str]):
    from dpcli.adapters import ddpm_original

    state_dict = source.state_dict()
    original_layout = ddpm_original.is_original_ddpm_state_dict(list(state_dict))
    if config_path is not None:
        config = diffusers_files.read_config_file(config_path)
    elif original_layout:
        config, assumptions = ddpm_original.infer_original_config(state_dict)
        notes.extend(assumptions)
        notes.append("config inferred from weight shapes; pass --config to override")
    else:
        config, assumptions = infer_diffusers_config(state_dict)
        notes.extend(assumptions)
        notes.append("config inferred from weight shapes; pass --config to override")
    if original_layout:
        state_dict = ddpm_original.original_to_diffusers(state_dict, config)
    model = build_unet(config)
    diffusers_files.load_weights_into(model, state_dict, str(source.path))
    layout = "original DDPM layout" if original_layout else "diffusers layout"
    return model, config, f"single file, {layout}"


def infer_diffusers_config(state_dict: dict) -> tuple[dict, list[str]]:
    """A UNet2DModel config from the shapes of a diffusers-layout state dict (DDPM conventions assumed)."""
    levels = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("down_blocks.")})
    if not levels or "conv_in.weight" not in state_dict:
        raise BadSetting("config", "cannot infer a UNet2DModel config from these weights; pass {config}")
    widths, layers, down_types = [], 0, []
    for level in levels:
        widths.append(int(state_dict[f"down_blocks.{level}.resnets.0.conv1.weight"].shape[0]))
        resnets = {k.split(".")[3] for k in state_dict if k.startswith(f"down_blocks.{level}.resnets.")}
        layers = max(layers, len(resnets))
        has_attention = any(k.startswith(f"down_blocks.{level}.attentions.") for k in state_dict)
        down_types.append("AttnDownBlock2D" if has_attention else "DownBlock2D")
    up_types = [t.replace("Down", "Up") for t in reversed(down_types)]
    groups = next((g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths)), 1)
    config = {
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": widths,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": int(state_dict["conv_in.weight"].shape[1]),
        "out_channels": int(state_dict["conv_out.weight"].shape[0]),
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": groups,
        "sample_size": 32,
        "time_embedding_type": "positional",
    }
    notes = [f"assumed norm_num_groups={groups} and sample_size=32 (not stored in weights)"]
    return config, notes


def load_saved_unet2d(source: ModelSource, adapter_name: str) -> LoadedModel:
    """A model folder written by dpcli (pruned and/or fine-tuned), rebuilt exactly, without pickle."""
    from dpcli.adapters.diffusers_fixes import fix_attributes

    model, info = model_format.load_saved_model(source.path, build_unet, fix_attributes)
    scheduler, origin = model_format.saved_scheduler(source.path)
    config = info["base"]["config"]
    pruned = info.get("pruning") is not None
    return LoadedModel(
        model=model,
        adapter=adapter_name,
        source=source.spec,
        source_kind="dpcli " + ("pruned model" if pruned else "model"),
        config=dict(config),
        sample_size=_sample_size(config),
        in_channels=int(config.get("in_channels", 3)),
        scheduler=scheduler,
        scheduler_origin=origin,
        pruning=info,
    )


def example_inputs(loaded: LoadedModel, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy sample and timestep batch at the model's native size, on the model's device."""
    parameter = next(loaded.model.parameters())
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(
        batch_size, loaded.in_channels, loaded.sample_size, loaded.sample_size, generator=generator
    )
    timesteps = torch.full((batch_size,), 10, dtype=torch.long)
    return sample.to(parameter.device, parameter.dtype), timesteps.to(parameter.device)
