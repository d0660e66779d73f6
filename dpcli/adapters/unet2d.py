"""Loading and running diffusers ``UNet2DModel`` denoisers (the ``ddpm`` adapter's machinery)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel, ModelSource
from dpcli.errors import BadInput
from dpcli.loading import load_tensor_file

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
CONFIGS = RESOURCES / "configs"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin")
DEFAULT_SCHEDULER_NOTE = "diffusers DDPMScheduler defaults (1000 steps, linear betas 1e-4..0.02)"


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


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
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return UNet2DModel.from_config(config).eval()
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            raise BadInput(f"invalid UNet2DModel config: {exc}") from None


def read_config_file(path: Path) -> dict:
    """A diffusers config from a JSON file or a folder holding config.json (or unet/config.json)."""
    path = Path(path)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError as exc:
                raise BadInput(f"{candidate} is not valid JSON: {exc}") from None
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


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a diffusers model folder: single file or sharded index, safetensors preferred."""
    for index_name in (
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin.index.json",
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            merged: dict[str, torch.Tensor] = {}
            for shard in shards:
                merged.update(load_tensor_file(folder / shard))
            return merged
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return load_tensor_file(folder / name)
    raise BadInput(f"no weights in {folder} (expected one of {', '.join(WEIGHT_NAMES)})")


def load_scheduler(path: Path):
    """A diffusers scheduler from a scheduler_config.json file or a folder holding one."""
    import diffusers

    path = Path(path)
    file = path if path.is_file() else path / "scheduler_config.json"
    if not file.is_file() and (path / "scheduler" / "scheduler_config.json").is_file():
        file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise BadInput(f"no scheduler_config.json at {path}")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise BadInput(f"{file} is not valid JSON: {exc}") from None
    class_name = str(config.get("_class_name", "DDPMScheduler"))
    scheduler_class = getattr(diffusers, class_name, None)
    if not class_name.endswith("Scheduler") or scheduler_class is None:
        raise BadInput(f"{file}: unknown scheduler class {class_name!r}")
    return scheduler_class.from_config(config)


def default_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def _unet_keys(keys) -> bool:
    keys = set(keys)
    return (
        "conv_in.weight" in keys
        and any(k.startswith("down_blocks.") for k in keys)
        and not any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys)
    )


def unet_class_of(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("_class_name")
    except ValueError:
        return None


def detect_unet2d(source: ModelSource) -> float:
    """How likely ``source`` is a plain (pixel-space) UNet2DModel DDPM."""
    if source.kind == "builtin":
        prefix, name = _builtin_name(source)
        names = builtin_model_names() if prefix == "builtin" else builtin_config_names()
        return 1.0 if name in names else 0.0
    if source.path is None:
        return 0.0
    if source.kind in ("folder", "hub"):
        from dpcli.saving import read_metadata

        saved = read_metadata(source.path)
        if saved is not None:
            return 1.0 if saved.get("adapter") == "ddpm" else 0.0
        index = source.read_json("model_index.json")
        if index is not None:
            unet = index.get("unet")
            has_autoencoder = any(k in index for k in ("vqvae", "vae", "vq_vae"))
            return 0.9 if unet and unet[-1] == "UNet2DModel" and not has_autoencoder else 0.0
        return 0.9 if unet_class_of(source.path) == "UNet2DModel" else 0.0
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
    scheduler_origin = DEFAULT_SCHEDULER_NOTE
    source_kind = source.kind

    if source.kind == "builtin" and _builtin_name(source)[0] == "builtin":
        folder = RESOURCES / _builtin_name(source)[1]
        loaded = load_saved_unet2d(ModelSource(spec=source.spec, kind="builtin", path=folder), adapter_name)
        loaded.source_kind = "built-in trained model"
        return loaded
    if source.kind == "builtin":
        name = _builtin_name(source)[1]
        config = read_config_file(CONFIGS / f"{name}.json")
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
                scheduler = load_scheduler(scheduler_dir)
                scheduler_origin = f"{type(scheduler).__name__} from the pipeline"
            source_kind = "diffusers pipeline" + (" (Hub cache)" if source.kind == "hub" else "")
        else:
            source_kind = "diffusers model folder" + (" (Hub cache)" if source.kind == "hub" else "")
        config = read_config_file(config_path) if config_path else read_config_file(folder)
        model = build_unet(config)
        load_weights_into(model, folder_weights(folder), str(folder))
    elif source.suffix == ".json":
        config = read_config_file(source.path)
        model = build_unet(config)
        source_kind = "config file, random weights"
        notes.append("architecture only: weights are random (seed 0)")
    else:
        model, config, source_kind = _load_single_file(source, config_path, notes)

    if scheduler is None:
        scheduler = default_scheduler()
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
        config = read_config_file(config_path)
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
    load_weights_into(model, state_dict, str(source.path))
    layout = "original DDPM layout" if original_layout else "diffusers layout"
    return model, config, f"single file, {layout}"


def infer_diffusers_config(state_dict: dict) -> tuple[dict, list[str]]:
    """A UNet2DModel config from the shapes of a diffusers-layout state dict (DDPM conventions assumed)."""
    levels = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("down_blocks.")})
    if not levels or "conv_in.weight" not in state_dict:
        raise BadInput("cannot infer a UNet2DModel config from these weights; pass --config")
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
    from dpcli.saving import apply_shapes, load_weights, read_metadata

    info = read_metadata(source.path)
    if info is None:
        raise BadInput(f"{source.path}/dpcli.json is not dpcli model metadata")
    config = info["base"]["config"]
    model = build_unet(config)
    apply_shapes(model, info["modules"])
    heads = {name: spec["heads"] for name, spec in info["modules"].items() if "heads" in spec}
    fix_attributes(model, heads)
    load_weights_into(model, load_weights(source.path, info), str(source.path))
    scheduler_dir = source.path / "scheduler"
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler, origin = load_scheduler(scheduler_dir), "saved with the model"
    else:
        scheduler, origin = default_scheduler(), DEFAULT_SCHEDULER_NOTE
    pruned = info.get("pruning") is not None
    return LoadedModel(
        model=model.eval(),
        adapter=adapter_name,
        source=source.spec,
        source_kind="dpcli " + ("pruned model" if pruned else "model"),
        config=dict(config),
        sample_size=_sample_size(config),
        in_channels=int(config.get("in_channels", 3)),
        scheduler=scheduler,
        scheduler_origin=f"{type(scheduler).__name__} {origin}",
        pruning=info,
    )


def save_unet2d(loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
    """Write ``loaded`` in the dpcli format (see ``dpcli.saving.save_model``)."""
    from dpcli.saving import save_model

    return save_model(loaded, folder, metadata)


def example_inputs(loaded: LoadedModel, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy sample and timestep batch at the model's native size, on the model's device."""
    parameter = next(loaded.model.parameters())
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(
        batch_size, loaded.in_channels, loaded.sample_size, loaded.sample_size, generator=generator
    )
    timesteps = torch.full((batch_size,), 10, dtype=torch.long)
    return sample.to(parameter.device, parameter.dtype), timesteps.to(parameter.device)
