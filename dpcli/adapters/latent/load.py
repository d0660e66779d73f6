"""Loading latent diffusion models: the UNet, its autoencoder, text encoder, tokenizer and class embedder.

Weights are read only through ``dpcli.io.weights.load_tensor_file``; no pickle is ever run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel, ModelSource
from dpcli.adapters.latent.detect import (
    AUTOENCODER_CLASSES,
    AUTOENCODER_KEYS,
    CLASS_EMBEDDER_FILE,
    TEXT_ENCODER_CLASSES,
    TRANSFORMERS_WEIGHTS,
    UNET_CLASSES,
)
from dpcli.adapters.latent.facts import describe, latent_facts
from dpcli.adapters.latent.sdxl import REFINER_REFUSAL, check_unet, is_sdxl
from dpcli.adapters.latent.sgm import is_sgm_state_dict, load_sgm
from dpcli.errors import BadInput
from dpcli.io.diffusers_files import folder_weights
from dpcli.weights_dtype import default_dtype, target_dtype, to_target


def load_latent(source: ModelSource, adapter_name: str, config_path: Path | None = None) -> LoadedModel:
    """Load a latent diffusion model (its UNet, autoencoder, text encoder / class embedder, scheduler)."""
    from dpcli.io.diffusers_files import read_config_file

    notes: list[str] = []
    components: dict = {}
    recorded: dict = {}
    scheduler = None
    scheduler_origin = ""
    hub = " (Hub cache)" if source.kind == "hub" else ""
    if source.kind == "builtin":
        from dpcli.adapters.unet2d import CONFIGS, builtin_config_names

        prefix, _, name = source.spec.partition(":")
        if prefix != "config" or name not in builtin_config_names("UNet2DConditionModel"):
            known = ", ".join(f"config:{n}" for n in builtin_config_names("UNet2DConditionModel"))
            raise BadInput(f"the ldm adapter has no built-in model {source.spec} (built-in configs: {known})")
        config = read_config_file(CONFIGS / f"{name}.json")
        unet = build_random(_class_of(config, UNET_CLASSES), config)
        source_kind = "built-in config, random weights"
        notes.append("architecture only: weights are random (seed 0)")
        if (CONFIGS / name / "scheduler" / "scheduler_config.json").is_file():
            from dpcli.io.diffusers_files import load_scheduler

            scheduler = load_scheduler(CONFIGS / name / "scheduler")
            scheduler_origin = f"{type(scheduler).__name__} of {name}"
    elif source.path is None:
        raise BadInput(f"the ldm adapter has no built-in models ({source.spec})")
    elif source.kind in ("folder", "hub") and (source.path / "dpcli.json").is_file():
        return load_saved_latent(source, adapter_name)
    elif source.kind in ("folder", "hub") and (source.path / "model_index.json").is_file():
        unet, components, scheduler, scheduler_origin = _load_pipeline(source.path, config_path, notes)
        source_kind = f"diffusers pipeline{hub}"
        recorded = json.loads((source.path / "model_index.json").read_text())
    elif source.kind in ("folder", "hub"):
        config = read_config_file(config_path or source.path)
        unet = instantiate(
            _class_of(config, UNET_CLASSES), config, folder_weights(source.path), str(source.path)
        )
        source_kind = f"diffusers UNet folder{hub}, no autoencoder"
    elif source.suffix == ".json":
        config = read_config_file(source.path)
        unet = build_random(_class_of(config, UNET_CLASSES), config)
        source_kind = "config file, random weights"
        notes.append("architecture only: weights are random (seed 0)")
    elif is_sgm_state_dict(source.state_dict()):
        unet, components, scheduler, scheduler_origin = load_sgm(source, config_path, notes)
        source_kind = "single file, SGM (SDXL) layout"
    else:
        unet, components, scheduler = _load_compvis(source, config_path, notes)
        scheduler_origin = f"{type(scheduler).__name__} from the checkpoint's YAML"
        source_kind = "single file, CompVis layout"
    if scheduler is None:
        from dpcli.io.diffusers_files import DEFAULT_SCHEDULER_NOTE, default_scheduler

        scheduler, scheduler_origin = default_scheduler(), DEFAULT_SCHEDULER_NOTE
    return finish_loading(
        unet,
        components,
        scheduler,
        scheduler_origin,
        adapter_name,
        source.spec,
        source_kind,
        notes,
        recorded=recorded,
    )


# Facts a pipeline's model_index.json (or a dpcli folder's "latent" record) may set for the hooks.
RECORDED_FACTS = ("force_zeros_for_empty_prompt",)


def finish_loading(
    unet,
    components,
    scheduler,
    scheduler_origin,
    adapter_name,
    spec,
    source_kind,
    notes,
    record=None,
    recorded: dict | None = None,
) -> LoadedModel:
    """The LoadedModel of a latent model: checks what dp can run, works out the ``extras``."""
    _check_supported(unet)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    config = dict(unet.config)
    loaded = LoadedModel(
        model=unet.eval(),
        adapter_name=adapter_name,
        source=spec,
        source_kind=source_kind,
        config=config,
        sample_size=_sample_size(config),
        in_channels=int(config.get("in_channels", 4)),
        scheduler=scheduler,
        scheduler_origin=scheduler_origin,
        components=components,
        record=record,
        notes=list(notes),
    )
    loaded.extras = latent_facts(loaded)
    for key in RECORDED_FACTS:
        if key in loaded.extras and (recorded or {}).get(key) is not None:
            loaded.extras[key] = recorded[key]
    loaded.notes.insert(0, describe(loaded))
    return loaded


def _check_supported(unet) -> None:
    config = unet.config
    name = type(unet).__name__
    if getattr(config, "addition_embed_type", None) not in (None, "text_time"):
        raise BadInput(
            f"UNets with added conditioning {config.addition_embed_type!r} are not supported (supported: text_time, SDXL)"
        )
    if getattr(config, "encoder_hid_dim_type", None) is not None:
        raise BadInput(
            f"UNets with an encoder projection ({config.encoder_hid_dim_type}) are not supported yet"
        )
    if getattr(config, "class_embed_type", None) is not None:
        raise BadInput(
            f"{name} with class_embed_type {config.class_embed_type!r} is not supported "
            "(supported: class labels through num_class_embeds)"
        )
    if is_sdxl(unet):
        check_unet(unet)
    channels_in, channels_out = int(config.in_channels), int(config.out_channels)
    if channels_out not in (channels_in, 2 * channels_in):
        raise BadInput(
            f"the UNet takes {channels_in} channels and predicts {channels_out}: inpainting, upscaling and "
            "other image-conditioned UNets are not supported"
        )


def _sample_size(config: dict) -> int:
    size = config.get("sample_size") or 64
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _class_of(config: dict, allowed: tuple[str, ...]) -> str:
    name = config.get("_class_name")
    if name not in allowed:
        raise BadInput(
            f"config describes a {name or 'model without _class_name'}, expected one of {', '.join(allowed)}"
        )
    return name


def build_random(class_name: str, config: dict, seed: int = 0):
    """A diffusers model from its config with seeded random weights, allocated and drawn in the target
    dtype (``dpcli.weights_dtype``)."""
    import diffusers

    from dpcli.sizing import check_buildable

    model_class = getattr(diffusers, class_name)
    with torch.random.fork_rng(devices=[]):
        try:
            check_buildable(lambda: model_class.from_config(config), f"the {class_name} of this config")
            torch.manual_seed(seed)
            with default_dtype():  # built in the target dtype: bf16 never goes through a float32 copy
                return model_class.from_config(config).eval()
        except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            raise BadInput(f"invalid {class_name} config: {str(exc).splitlines()[0]}") from None


def instantiate(class_name: str, config: dict, state_dict: dict, origin: str, shapes: dict | None = None):
    """A diffusers model from config + weights, without spending time on a random initialisation.

    The model is built on the meta device, given ``shapes`` (pruned widths) if any, and the checkpoint's
    tensors are assigned to it after the same strict checks as everywhere (missing, unexpected, shapes).
    """
    import diffusers

    from dpcli.adapters.diffusers_fixes import fix_attributes

    model_class = getattr(diffusers, class_name)
    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise BadInput(f"invalid {class_name} config in {origin}: {exc}") from None
    if shapes:
        from dpcli.io.model_format import apply_shapes

        apply_shapes(model, shapes)
        fix_attributes(model, {name: spec["heads"] for name, spec in shapes.items() if "heads" in spec})
    state_dict = dict(state_dict)
    if hasattr(model, "_fix_state_dict_keys_on_load"):
        model._fix_state_dict_keys_on_load(state_dict)  # renames pre-0.14 attention weights (query -> to_q)
    assign_weights(model, state_dict, origin)
    return model.eval()


def assign_weights(model: torch.nn.Module, state_dict: dict, origin: str) -> None:
    """Strictly load ``state_dict`` into a model built on the meta device (floating tensors become the
    target dtype, ``dpcli.weights_dtype``: float32 unless loading in bf16/fp16)."""
    from dpcli.io.diffusers_files import check_weights_fit

    check_weights_fit(model, state_dict, origin)
    tensors = {k: to_target(v) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise BadInput(f"{origin}: {leftover[0]} has no weights")


def _load_pipeline(folder: Path, config_path: Path | None, notes: list[str]):
    from dpcli.io.diffusers_files import load_scheduler, read_config_file

    index = json.loads((folder / "model_index.json").read_text())
    unet_folder = folder / "unet"
    config = read_config_file(config_path or unet_folder)
    unet = instantiate(_class_of(config, UNET_CLASSES), config, folder_weights(unet_folder), str(unet_folder))
    components = load_components(folder, _component_entries(index))
    scheduler, origin = None, ""
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        scheduler = load_scheduler(folder / "scheduler")
        origin = f"{type(scheduler).__name__} from the pipeline"
    if "vae" not in components:
        notes.append("no autoencoder in this pipeline: calibration images cannot be encoded")
    return unet, components, scheduler, origin


def _component_entries(index: dict) -> dict[str, tuple[str, str]]:
    """``{our name: (folder, class)}`` for the autoencoder, text encoder and tokenizer of a model_index."""
    entries = {}
    for key in AUTOENCODER_KEYS:
        if _entry_class(index.get(key)):
            entries["vae"] = (key, _entry_class(index[key]))
            break
    if index.get("requires_aesthetics_score") or (
        _entry_class(index.get("text_encoder_2")) and not _entry_class(index.get("text_encoder"))
    ):
        raise BadInput(REFINER_REFUSAL)
    for key in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if _entry_class(index.get(key)):
            entries[key] = (key, _entry_class(index[key]))
    return entries


def _entry_class(entry) -> str | None:
    return entry[-1] if isinstance(entry, (list, tuple)) and entry and entry[-1] else None


def load_components(folder: Path, entries: dict[str, tuple[str, str]]) -> dict:
    """Components saved in sub-folders (diffusers pipeline or dpcli folder layout), weights read safely."""
    components = {}
    for name, (subfolder, class_name) in entries.items():
        path = folder / subfolder
        if not path.is_dir():
            raise BadInput(f"{path} is missing: the model folder is incomplete")
        if name == "vae":
            components[name] = load_autoencoder(path, class_name)
        elif name in ("text_encoder", "text_encoder_2"):
            components[name] = load_text_encoder(path, class_name)
        elif name in ("tokenizer", "tokenizer_2"):
            components[name] = load_tokenizer(path, class_name)
        elif name == "class_embedder":
            components[name] = load_class_embedder(path)
    return components


def load_autoencoder(path: Path, class_name: str | None = None):
    from dpcli.io.diffusers_files import read_config_file

    config = read_config_file(path)
    class_name = config.get("_class_name") or class_name
    if class_name not in AUTOENCODER_CLASSES:
        raise BadInput(
            f"{path}: autoencoder class {class_name} is not supported ({', '.join(AUTOENCODER_CLASSES)})"
        )
    return instantiate(class_name, config, folder_weights(path), str(path))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BadInput(
            "this model has a text encoder, which needs the 'transformers' package (pip install transformers)"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def load_text_encoder(path: Path, class_name: str | None = "CLIPTextModel"):
    if class_name not in TEXT_ENCODER_CLASSES:
        raise BadInput(
            f"{path}: text encoder {class_name} is not supported (supported: {', '.join(TEXT_ENCODER_CLASSES)})"
        )
    transformers = _transformers()
    try:
        config = transformers.CLIPTextConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: unreadable text encoder config ({str(exc).splitlines()[0]})") from None
    return build_text_encoder(config, folder_weights(path, TRANSFORMERS_WEIGHTS), str(path), class_name)


def build_text_encoder(config, state_dict: dict, origin: str, class_name: str = "CLIPTextModel"):
    """A CLIPTextModel (or CLIPTextModelWithProjection, SDXL's second encoder) with ``state_dict``
    (``text_model.`` prefix either way, position ids optional)."""
    transformers = _transformers()
    if isinstance(config, dict):
        config = transformers.CLIPTextConfig(**config)
    # the dtype the inner CLIPTextModel of a ...WithProjection is built in (transformers reads the config)
    config.dtype = config.torch_dtype = target_dtype()
    with torch.random.fork_rng(devices=[]), default_dtype():
        model = getattr(transformers, class_name)(config)
    own = set(model.state_dict())
    wrapped = any(key.startswith("text_model.") for key in own)
    cleaned = {}
    for key, tensor in state_dict.items():
        key = key if not wrapped or key in own or key.startswith("text_model.") else f"text_model.{key}"
        key = key if wrapped else key.removeprefix("text_model.")
        if key not in own and key.rsplit(".", 1)[-1] in ("position_ids", "logit_scale"):
            continue  # buffers some versions save and others do not
        if key not in own and key == "text_projection.weight":
            continue  # OpenCLIP's projection; Stable Diffusion uses the hidden states before it
        cleaned[key] = to_target(tensor)
    from dpcli.io.diffusers_files import load_weights_into

    load_weights_into(model, {**_missing_buffers(model, cleaned), **cleaned}, origin)
    return model.eval()


def _missing_buffers(model: torch.nn.Module, state_dict: dict) -> dict:
    """Persistent buffers (e.g. position_ids in older transformers) the checkpoint did not save."""
    return {
        name: buffer
        for name, buffer in model.named_buffers()
        if name not in state_dict and name in model.state_dict()
    }


def load_tokenizer(path: Path, class_name: str | None = None):
    transformers = _transformers()
    tokenizer_class = getattr(transformers, class_name or "", None) or transformers.CLIPTokenizer
    try:
        return tokenizer_class.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise BadInput(f"{path}: unreadable tokenizer ({str(exc).splitlines()[0]})") from None


def load_class_embedder(path: Path) -> torch.nn.Embedding:
    from dpcli.io.weights import load_tensor_file

    weight = load_tensor_file(path / CLASS_EMBEDDER_FILE).get("weight")
    if weight is None or weight.dim() != 2:
        raise BadInput(f"{path}/{CLASS_EMBEDDER_FILE} holds no class embedding table")
    return class_embedder(weight)


def class_embedder(weight: torch.Tensor) -> torch.nn.Embedding:
    embedder = torch.nn.Embedding(*weight.shape, device="meta")
    embedder.weight = torch.nn.Parameter(weight.to(target_dtype()), requires_grad=False)
    return embedder.eval()


def _load_compvis(source: ModelSource, config_path: Path | None, notes: list[str]):
    from diffusers import DDIMScheduler

    from dpcli.adapters import compvis

    state_dict = source.state_dict()
    if not compvis.is_compvis_state_dict(state_dict):
        raise BadInput(
            f"{source.path} is not a CompVis latent-diffusion checkpoint (no {compvis.UNET_PREFIX}* weights)"
        )
    yaml_path = compvis.find_original_config(source.path, config_path)
    original = compvis.read_original_config(yaml_path)
    notes.append(f"architecture from {yaml_path}")
    origin = str(source.path)
    unet_config, unet_weights, unet_notes = compvis.unet_from_compvis(state_dict, original)
    notes.extend(unet_notes)
    unet = instantiate("UNet2DConditionModel", unet_config, unet_weights, f"{origin} (UNet)")
    vae_class, vae_config, vae_weights = compvis.vae_from_compvis(state_dict, original)
    components = {"vae": instantiate(vae_class, vae_config, vae_weights, f"{origin} (first stage)")}
    kind = compvis.conditioning_kind(original)
    if kind in ("clip", "open_clip"):
        text_config, text_notes = compvis.text_encoder_config(state_dict, kind, original)
        notes.extend(text_notes)
        text_weights = compvis.text_encoder_from_compvis(
            state_dict, kind, original, text_config["hidden_size"]
        )
        components["text_encoder"] = build_text_encoder(text_config, text_weights, f"{origin} (text encoder)")
        tokenizer = _find_tokenizer(source.path, compvis.tokenizer_candidates(kind, original))
        if tokenizer is None:
            notes.append(
                "no tokenizer found (a tokenizer/ folder beside the checkpoint, or the Hugging Face cache): "
                "prompts cannot be encoded"
            )
        else:
            components["tokenizer"] = tokenizer
    elif kind == "class":
        components["class_embedder"] = class_embedder(compvis.class_embedder_from_compvis(state_dict))
    scheduler = DDIMScheduler.from_config(compvis.scheduler_config(original))
    return unet, components, scheduler


def _find_tokenizer(checkpoint: Path, candidates: list[tuple[str, str | None]], folder: str = "tokenizer"):
    """A tokenizer folder (``folder``) beside the checkpoint, else a cached Hub tokenizer (never downloaded)."""
    beside = checkpoint.parent / folder
    if beside.is_dir():
        return load_tokenizer(beside)
    transformers = _transformers()
    for repo, subfolder in candidates:
        try:
            return transformers.CLIPTokenizer.from_pretrained(
                repo, subfolder=subfolder or "", local_files_only=True
            )
        except Exception:  # not cached: try the next one
            continue
    return None


def load_saved_latent(source: ModelSource, adapter_name: str) -> LoadedModel:
    """A model folder written by dpcli for a latent model: pruned UNet rebuilt exactly, components as saved."""
    from dpcli.io.model_format import load_weights, read_metadata, saved_scheduler

    info = read_metadata(source.path)
    if info is None:
        raise BadInput(f"{source.path}/dpcli.json is not dpcli model metadata")
    class_name = info.get("class")
    if class_name not in UNET_CLASSES:
        raise BadInput(f"{source.path}: saved model class {class_name} is not a latent UNet")
    unet = instantiate(
        class_name,
        info["base"]["config"],
        load_weights(source.path, info),
        str(source.path),
        shapes=info["modules"],
    )
    entries = {name: (spec["path"], spec["class"]) for name, spec in info.get("components", {}).items()}
    components = load_components(source.path, entries)
    scheduler, origin = saved_scheduler(source.path)
    pruned = info.get("pruning") is not None
    return finish_loading(
        unet,
        components,
        scheduler,
        origin,
        adapter_name,
        source.spec,
        "dpcli " + ("pruned latent model" if pruned else "latent model"),
        [],
        record=info,
        recorded=info.get("latent"),
    )
