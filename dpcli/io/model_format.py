"""The dpcli model format: safetensors under the original parameter names + JSON metadata. No pickle.

Layout of a saved model folder::

    dpcli.json                                   format, base config, per-module shapes, history, sizes
    unet/config.json                             the BASE diffusers config (before pruning)
    unet/diffusion_pytorch_model.safetensors     the weights, original parameter names, pruned shapes
    scheduler/scheduler_config.json              the scheduler the model was loaded with

Saving (``save_model``) and loading (``load_saved_model``) sit side by side here. Loading builds the
model from the base config, gives every module whose saved shape differs that shape (in place, so
diffusers classes and their forward code stay), lets the adapter fix derived attributes, and loads the
weights with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from dpcli import __version__
from dpcli.errors import BadInput
from dpcli.io.diffusers_files import (
    DEFAULT_SCHEDULER_NOTE,
    default_scheduler,
    load_scheduler,
    load_weights_into,
)
from dpcli.io.files import final_name
from dpcli.io.metadata import (  # noqa: F401  (re-exported: part of the stable plugin API)
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    read_metadata,
)
from dpcli.io.model_card import write_model_card
from dpcli.io.weights import load_tensor_file
from dpcli.sizing import check_fits

WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"


def layer_widths(module: torch.nn.Module) -> dict:
    """The widths pruning changes in one module: conv/linear in/out (and conv groups), norm width and
    groups, embedding sizes, attention heads; empty for other modules. The one width table of dpcli."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, torch.nn.Linear):
        return {"in_channels": module.in_features, "out_channels": module.out_features}
    if isinstance(module, torch.nn.GroupNorm):
        return {
            "in_channels": module.num_channels,
            "out_channels": module.num_channels,
            "groups": module.num_groups,
        }
    if isinstance(module, torch.nn.LayerNorm):
        width = int(module.normalized_shape[-1])
        return {"in_channels": width, "out_channels": width}
    if isinstance(module, torch.nn.Embedding):
        return {"in_channels": module.num_embeddings, "out_channels": module.embedding_dim}
    if hasattr(module, "heads") and hasattr(module, "to_q"):
        return {"heads": int(module.heads)}
    return {}


# The type recorded for modules whose subclasses share one set of widths.
_RECORDED_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)


def module_shapes(model: torch.nn.Module) -> dict[str, dict]:
    """Widths of every conv, linear, norm, embedding and attention module: what pruning changes."""
    shapes: dict[str, dict] = {}
    for name, module in model.named_modules():
        widths = layer_widths(module)
        if widths:
            recorded = next((t for t in _RECORDED_TYPES if isinstance(module, t)), type(module))
            shapes[name] = {"type": recorded.__name__, **widths}
    return shapes


def model_signature(model: torch.nn.Module) -> str:
    """A short hash of the model's module widths: scores only apply to a model of the same shape."""
    text = json.dumps(module_shapes(model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resize_parameter(module: torch.nn.Module, attribute: str, shape: tuple[int, ...]) -> None:
    old = getattr(module, attribute, None)
    if old is None or tuple(old.shape) == shape:
        return
    setattr(
        module,
        attribute,
        torch.nn.Parameter(
            torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
        ),
    )


def _check_widths(name: str, spec: dict) -> None:
    """Every saved width a positive whole number, and groups that divide the channels they group."""
    if "heads" in spec:
        keys = ["heads"]
    else:
        keys = ["in_channels", "out_channels"] + (["groups"] if "groups" in spec else [])
    for key in keys:
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"saved shapes: {name} has {key} {value!r}, expected a whole number >= 1")
    groups = spec.get("groups")
    if groups and (spec["in_channels"] % groups or spec["out_channels"] % groups):
        raise BadInput(
            f"saved shapes: {name} has {spec['in_channels']} -> {spec['out_channels']} channels in "
            f"{groups} groups, which do not divide them"
        )


def apply_shapes(model: torch.nn.Module, shapes: dict[str, dict]) -> None:
    """Give each module the saved widths (parameters re-allocated, attributes updated); values come later."""
    modules = dict(model.named_modules())
    unknown = [name for name in shapes if name not in modules]
    if unknown:
        raise BadInput(f"saved shapes name modules the model does not have (e.g. {unknown[0]})")
    for name, spec in shapes.items():
        _check_widths(name, spec)
    for name, spec in shapes.items():
        module = modules[name]
        if "heads" in spec:
            module.heads = int(spec["heads"])
            continue
        new_in, new_out = int(spec["in_channels"]), int(spec["out_channels"])
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            module.in_channels, module.out_channels = new_in, new_out
            module.groups = int(spec.get("groups", module.groups))
            transposed = module.transposed
            weight = (new_in, new_out // module.groups) if transposed else (new_out, new_in // module.groups)
            _resize_parameter(module, "weight", (*weight, *module.kernel_size))
            _resize_parameter(module, "bias", (new_out,))
        elif isinstance(module, torch.nn.Linear):
            module.in_features, module.out_features = new_in, new_out
            _resize_parameter(module, "weight", (new_out, new_in))
            _resize_parameter(module, "bias", (new_out,))
        elif isinstance(module, torch.nn.GroupNorm):
            module.num_channels = new_out
            module.num_groups = int(spec.get("groups", module.num_groups))
            _resize_parameter(module, "weight", (new_out,))
            _resize_parameter(module, "bias", (new_out,))
        elif isinstance(module, torch.nn.LayerNorm):
            module.normalized_shape = (*module.normalized_shape[:-1], new_out)
            _resize_parameter(module, "weight", module.normalized_shape)
            _resize_parameter(module, "bias", module.normalized_shape)
        elif isinstance(module, torch.nn.Embedding):
            module.num_embeddings, module.embedding_dim = new_in, new_out
            _resize_parameter(module, "weight", (new_in, new_out))


def write_model(
    folder: Path,
    model: torch.nn.Module,
    adapter: str,
    base_config: dict,
    base_source: str,
    original_modules: dict,
    scheduler=None,
    metadata: dict | None = None,
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict:
    """Write a model folder in the dpcli format into ``folder`` (which should be an AtomicFolder path).

    ``extra_weights`` maps a file name under ``unet/`` (e.g. ``raw.safetensors``) to another state dict
    of the same shapes. Returns the metadata written.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    for name, extra in (extra_weights or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(folder / "unet" / name))
    clean_config = {k: v for k, v in base_config.items() if not k.startswith("_") or k == "_class_name"}
    (folder / "unet" / "config.json").write_text(json.dumps(clean_config, indent=2))
    if scheduler is not None:
        scheduler.save_config(str(folder / "scheduler"))
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dpcli_version": __version__,
        "adapter": adapter,
        "class": type(model).__name__,
        "base": {"source": base_source, "config": clean_config},
        "weights": WEIGHTS_FILE,
        "modules": module_shapes(model),
        "original_modules": original_modules,
        **(metadata or {}),
    }
    (folder / METADATA_FILE).write_text(json.dumps(info, indent=2, default=str))
    write_model_card(folder, json.loads(json.dumps(info, default=str)), name=final_name(folder))
    return info


def save_model(loaded, folder: Path, metadata: dict, base_config: dict | None = None) -> dict:
    """Write ``loaded`` (a ``LoadedModel``) into ``folder`` in the dpcli format; what adapters' ``save`` call.

    The base config, original widths and history carry over from a dpcli source (``loaded.record``);
    ``metadata`` may hold ``original_modules`` (widths before pruning), ``history`` entries to append and
    ``extra_weights`` (more state dicts of the same shapes, saved under ``unet/``); everything else in it is
    recorded in dpcli.json. ``base_config`` overrides ``loaded.config`` as the config of a first save.
    Returns the metadata written.
    """
    metadata = dict(metadata)
    extra_weights = metadata.pop("extra_weights", None)
    merged = recorded_metadata(loaded, metadata, base_config)
    base, original = merged.pop("base"), merged.pop("original_modules")
    if (merged.get("pruning") or {}).get("layout") == "diffusers":
        from dpcli.layout import pipeline_index

        index = pipeline_index(loaded)  # the folder is also a plain diffusers pipeline
        if index is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2))
    return write_model(
        folder,
        loaded.model,
        loaded.adapter_name,
        base["config"],
        base["source"],
        original,
        scheduler=loaded.scheduler,
        metadata=merged,
        extra_weights=extra_weights,
    )


def recorded_metadata(loaded, metadata: dict, base_config: dict | None = None) -> dict:
    """What a save of ``loaded`` with ``metadata`` records (see ``save_model``): ``base``,
    ``original_modules``, ``pruning`` and ``sizes`` (carried over unless ``metadata`` replaces them), the
    ``history`` so far plus the new entries, and the other keys of ``metadata``. The Python API keeps this
    as ``loaded.record`` after an in-memory prune or fine-tune, so a model is recorded the same whether
    it was saved and reloaded between steps or not."""
    metadata = {k: v for k, v in metadata.items() if k != "extra_weights"}
    previous = loaded.record or {}
    given_original = metadata.pop("original_modules", None)
    base = previous.get("base") or {"config": base_config or loaded.config, "source": loaded.source}
    original = previous.get("original_modules") or given_original or module_shapes(loaded.model)
    merged = {k: v for k, v in previous.items() if k in ("pruning", "sizes")}
    merged.update(metadata)
    merged["history"] = list(previous.get("history", [])) + list(metadata.get("history", []))
    return {"base": base, "original_modules": original, **merged}


def load_weights(folder: Path, info: dict, name: str | None = None) -> dict[str, torch.Tensor]:
    """The saved weights (or the extra weights file ``unet/NAME``) of a dpcli model folder."""
    path = Path(folder) / (info["weights"] if name is None else f"unet/{name}")
    if not path.is_file():
        raise BadInput(f"{path} is missing: the model folder is incomplete")
    return load_tensor_file(path)


def load_saved_model(
    folder: Path,
    build: Callable[[dict], torch.nn.Module],
    fix: Callable[[torch.nn.Module, dict[str, int]], None] | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Rebuild a dpcli model folder: ``build(base config)``, the saved widths, ``fix(model, heads)`` for
    derived attributes, then the weights loaded strictly. Returns the model (eval mode) and dpcli.json."""
    folder = Path(folder)
    info = read_metadata(folder)
    if info is None:
        raise BadInput(f"{folder}/{METADATA_FILE} is not dpcli model metadata")
    with torch.device("meta"):  # shapes only: a corrupt or hostile dpcli.json is refused before allocating
        shapes_only = build(info["base"]["config"])
        apply_shapes(shapes_only, info["modules"])
    check_fits(shapes_only, f"the model in {folder}")
    model = build(info["base"]["config"])
    apply_shapes(model, info["modules"])
    if fix is not None:
        fix(model, {name: spec["heads"] for name, spec in info["modules"].items() if "heads" in spec})
    load_weights_into(model, load_weights(folder, info), str(folder))
    return model.eval(), info


def saved_scheduler(folder: Path) -> tuple[object, str]:
    """The scheduler saved in a model folder and where it came from, else diffusers' DDPM defaults."""
    scheduler_dir = Path(folder) / "scheduler"
    if (scheduler_dir / "scheduler_config.json").is_file():
        scheduler = load_scheduler(scheduler_dir)
        return scheduler, f"{type(scheduler).__name__} saved with the model"
    return default_scheduler(), DEFAULT_SCHEDULER_NOTE
