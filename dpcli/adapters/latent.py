"""Latent diffusion models: the ``ldm`` adapter's machinery.

A latent model is a denoising UNet (``UNet2DModel`` or ``UNet2DConditionModel``, the part that is pruned)
working on the latents of an autoencoder (``AutoencoderKL`` or ``VQModel``), optionally conditioned on
text (CLIP text encoder + tokenizer, Stable Diffusion 1.x/2.x), on class labels fed to the UNet's class
embedding, or on class labels embedded as cross-attention context (the CompVis ImageNet LDM).

``LoadedModel.extras`` carries what the hooks need besides the modules: ``conditioning`` (``none``,
``text``, ``class``, ``class-context`` or ``missing`` when the UNet expects a context nothing provides),
``scaling_factor`` / ``shift_factor`` of the latents, ``vae_scale_factor`` (pixels per latent),
``num_classes`` / ``null_class`` (the class used as unconditional input for guidance, if any) and
``context_length`` (tokens of the cross-attention context).

Weights are read only through ``dpcli.io.weights.load_tensor_file``; no pickle is ever run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli.adapters.base import LoadedModel, ModelSource
from dpcli.errors import BadInput
from dpcli.io.files import read_json

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
AUTOENCODER_CLASSES = ("AutoencoderKL", "VQModel")
AUTOENCODER_KEYS = ("vae", "vqvae")
TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLASS_EMBEDDER_FILE = "model.safetensors"
# Images encoded (or latents decoded) per autoencoder call: about 2 images of 512x512 at a time.
PIXELS_PER_CHUNK = 2**19


# Detection --------------------------------------------------------------------------------------------
def detect_latent(source: ModelSource) -> float:
    """How likely ``source`` is a latent diffusion model (pipeline, dpcli folder, UNet2DConditionModel, CompVis)."""
    if source.kind == "builtin" or source.path is None:
        return 0.0
    if source.kind in ("folder", "hub"):
        from dpcli.io.model_format import read_metadata

        saved = read_metadata(source.path)
        if saved is not None:
            return 1.0 if saved.get("adapter") == "ldm" else 0.0
        index = source.read_json("model_index.json")
        if index is not None:
            unet = (index.get("unet") or [None, None])[-1]
            if unet not in UNET_CLASSES:
                return 0.0
            if any(key in index for key in AUTOENCODER_KEYS):
                return 0.9
            return 0.5 if unet == "UNet2DConditionModel" else 0.0
        config = source.read_json("config.json")
        return 0.6 if config and config.get("_class_name") == "UNet2DConditionModel" else 0.0
    if source.suffix == ".json":
        try:
            return (
                0.6
                if json.loads(source.path.read_text()).get("_class_name") == "UNet2DConditionModel"
                else 0.0
            )
        except (ValueError, AttributeError):
            return 0.0
    if source.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        from dpcli.adapters.compvis import is_compvis_state_dict

        return 0.9 if is_compvis_state_dict(source.state_dict()) else 0.0
    return 0.0


# Loading ----------------------------------------------------------------------------------------------
def load_latent(source: ModelSource, adapter_name: str, config_path: Path | None = None) -> LoadedModel:
    """Load a latent diffusion model (its UNet, autoencoder, text encoder / class embedder, scheduler)."""
    from dpcli.io.diffusers_files import read_config_file

    notes: list[str] = []
    components: dict = {}
    scheduler = None
    scheduler_origin = ""
    hub = " (Hub cache)" if source.kind == "hub" else ""
    if source.path is None:
        raise BadInput(f"the ldm adapter has no built-in models ({source.spec})")
    if source.kind in ("folder", "hub") and (source.path / "dpcli.json").is_file():
        return load_saved_latent(source, adapter_name)
    if source.kind in ("folder", "hub") and (source.path / "model_index.json").is_file():
        unet, components, scheduler, scheduler_origin = _load_pipeline(source.path, config_path, notes)
        source_kind = f"diffusers pipeline{hub}"
    elif source.kind in ("folder", "hub"):
        from dpcli.io.diffusers_files import folder_weights

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
    else:
        unet, components, scheduler = _load_compvis(source, config_path, notes)
        scheduler_origin = f"{type(scheduler).__name__} from the checkpoint's YAML"
        source_kind = "single file, CompVis layout"
    if scheduler is None:
        from dpcli.io.diffusers_files import DEFAULT_SCHEDULER_NOTE, default_scheduler

        scheduler, scheduler_origin = default_scheduler(), DEFAULT_SCHEDULER_NOTE
    return finish_loading(
        unet, components, scheduler, scheduler_origin, adapter_name, source.spec, source_kind, notes
    )


def finish_loading(
    unet, components, scheduler, scheduler_origin, adapter_name, spec, source_kind, notes, pruning=None
) -> LoadedModel:
    """The LoadedModel of a latent model: checks what dp can run, works out the ``extras``."""
    _check_supported(unet)
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    config = dict(unet.config)
    loaded = LoadedModel(
        model=unet.eval(),
        adapter=adapter_name,
        source=spec,
        source_kind=source_kind,
        config=config,
        sample_size=_sample_size(config),
        in_channels=int(config.get("in_channels", 4)),
        scheduler=scheduler,
        scheduler_origin=scheduler_origin,
        components=components,
        pruning=pruning,
        notes=list(notes),
    )
    loaded.extras = latent_facts(loaded)
    loaded.notes.insert(0, describe(loaded))
    return loaded


def _check_supported(unet) -> None:
    config = unet.config
    name = type(unet).__name__
    if getattr(config, "addition_embed_type", None) is not None:
        raise BadInput(
            f"UNets with added conditioning ({config.addition_embed_type}, e.g. SDXL) are not supported yet"
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
    """A diffusers model from its config with seeded random weights."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return getattr(diffusers, class_name).from_config(config).eval()
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            raise BadInput(f"invalid {class_name} config: {exc}") from None


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
    """Strictly load ``state_dict`` into a model built on the meta device (tensors become float32)."""
    from dpcli.io.diffusers_files import check_weights_fit

    check_weights_fit(model, state_dict, origin)
    tensors = {
        k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
        for k, v in state_dict.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise BadInput(f"{origin}: {leftover[0]} has no weights")


def _load_pipeline(folder: Path, config_path: Path | None, notes: list[str]):
    from dpcli.io.diffusers_files import folder_weights, load_scheduler, read_config_file

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
    for key in ("text_encoder", "tokenizer"):
        if _entry_class(index.get(key)):
            entries[key] = (key, _entry_class(index[key]))
    if _entry_class(index.get("text_encoder_2")):
        raise BadInput("pipelines with two text encoders (SDXL) are not supported yet")
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
        elif name == "text_encoder":
            components[name] = load_text_encoder(path, class_name)
        elif name == "tokenizer":
            components[name] = load_tokenizer(path, class_name)
        elif name == "class_embedder":
            components[name] = load_class_embedder(path)
    return components


def load_autoencoder(path: Path, class_name: str | None = None):
    from dpcli.io.diffusers_files import folder_weights, read_config_file

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
        raise BadInput(f"{path}: text encoder {class_name} is not supported (supported: CLIPTextModel)")
    transformers = _transformers()
    try:
        config = transformers.CLIPTextConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: unreadable text encoder config ({str(exc).splitlines()[0]})") from None
    return build_text_encoder(config, _transformers_weights(path), str(path))


def build_text_encoder(config, state_dict: dict, origin: str):
    """A CLIPTextModel with ``state_dict`` (``text_model.`` prefix either way, position ids optional)."""
    transformers = _transformers()
    if isinstance(config, dict):
        config = transformers.CLIPTextConfig(**config)
    with torch.random.fork_rng(devices=[]):
        model = transformers.CLIPTextModel(config)
    own = set(model.state_dict())
    wrapped = any(key.startswith("text_model.") for key in own)
    cleaned = {}
    for key, tensor in state_dict.items():
        key = key if not wrapped or key.startswith("text_model.") else f"text_model.{key}"
        key = key if wrapped else key.removeprefix("text_model.")
        if key not in own and key.rsplit(".", 1)[-1] in ("position_ids", "logit_scale"):
            continue  # buffers some versions save and others do not
        if key not in own and key == "text_projection.weight":
            continue  # OpenCLIP's projection; Stable Diffusion uses the hidden states before it
        cleaned[key] = tensor
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


def _transformers_weights(path: Path) -> dict:
    from dpcli.io.weights import load_tensor_file

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            shards = sorted(set(read_json(path / index_name)["weight_map"].values()))
            merged = {}
            for shard in shards:
                merged.update(load_tensor_file(path / shard))
            return merged
    for name in TRANSFORMERS_WEIGHTS:
        if (path / name).is_file():
            return load_tensor_file(path / name)
    raise BadInput(f"no weights in {path} (expected one of {', '.join(TRANSFORMERS_WEIGHTS)})")


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
    embedder = torch.nn.Embedding(*weight.shape)
    embedder.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
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


def _find_tokenizer(checkpoint: Path, candidates: list[tuple[str, str | None]]):
    """A tokenizer folder beside the checkpoint, else a cached Hub tokenizer (never downloaded)."""
    beside = checkpoint.parent / "tokenizer"
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
        pruning=info,
    )


# What the hooks need to know ---------------------------------------------------------------------------
def has_cross_attention(unet) -> bool:
    blocks = [
        *getattr(unet, "down_blocks", []),
        getattr(unet, "mid_block", None),
        *getattr(unet, "up_blocks", []),
    ]
    return any(getattr(block, "has_cross_attention", False) for block in blocks if block is not None)


def latent_facts(loaded: LoadedModel) -> dict:
    unet = loaded.model
    components = loaded.components
    vae = components.get("vae")
    class_table = getattr(unet, "class_embedding", None)
    facts: dict = {"conditioning": "none", "num_classes": None, "null_class": None, "context_length": None}
    if "class_embedder" in components:
        table = components["class_embedder"].num_embeddings
        # CompVis ClassEmbedder convention: the last class is the unconditional one.
        facts.update(
            conditioning="class-context", num_classes=table - 1, null_class=table - 1, context_length=1
        )
    elif "text_encoder" in components:
        if not has_cross_attention(unet):
            raise BadInput("the pipeline has a text encoder but its UNet has no cross-attention")
        tokenizer = components.get("tokenizer")
        positions = int(components["text_encoder"].config.max_position_embeddings)
        length = min(int(tokenizer.model_max_length), positions) if tokenizer is not None else positions
        facts.update(conditioning="text", context_length=length)
    elif isinstance(class_table, torch.nn.Embedding):
        facts.update(conditioning="class", num_classes=class_table.num_embeddings)
    elif has_cross_attention(unet):
        facts.update(conditioning="missing", context_length=77)
    if vae is not None:
        facts.update(
            scaling_factor=float(getattr(vae.config, "scaling_factor", 1.0) or 1.0),
            shift_factor=getattr(vae.config, "shift_factor", None),
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
    return facts


def describe(loaded: LoadedModel) -> str:
    """One line for ``dp inspect``: latent and pixel sizes, autoencoder, conditioning."""
    extras = loaded.extras
    size, channels = loaded.sample_size, loaded.in_channels
    vae = loaded.components.get("vae")
    if vae is None:
        latent = f"latent diffusion UNet on {channels}x{size}x{size} latents (no autoencoder loaded)"
    else:
        factor = extras["vae_scale_factor"]
        latent = (
            f"latent diffusion: UNet on {channels}x{size}x{size} latents of {size * factor}x{size * factor} "
            f"images ({type(vae).__name__}, x{factor}, latents scaled by {extras['scaling_factor']:g})"
        )
    kind = extras["conditioning"]
    if kind == "text":
        encoder = type(loaded.components["text_encoder"]).__name__
        conditioning = f"text ({encoder}, {extras['context_length']} tokens)"
    elif kind == "class":
        conditioning = f"class labels ({extras['num_classes']} classes)"
    elif kind == "class-context":
        conditioning = (
            f"class labels as cross-attention context ({extras['num_classes']} classes + unconditional)"
        )
    elif kind == "missing":
        conditioning = "cross-attention context expected, but no text encoder or class embedder was found"
    else:
        conditioning = "unconditional"
    return f"{latent}; conditioning: {conditioning}"


def require_autoencoder(loaded: LoadedModel):
    vae = loaded.components.get("vae")
    if vae is None:
        raise BadInput(
            f"{loaded.source} has no autoencoder: images cannot be encoded or decoded; point dp at the whole "
            "pipeline folder (with vae/ or vqvae/)"
        )
    return vae


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# Hooks --------------------------------------------------------------------------------------------------
def example_inputs(loaded: LoadedModel, batch_size: int = 1) -> tuple:
    """Latents, timesteps and (for conditional UNets) a conditioning dict of the right shapes."""
    parameter = next(loaded.model.parameters())
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, loaded.in_channels, loaded.sample_size, loaded.sample_size)
    sample = torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype)
    timesteps = torch.full((batch_size,), 10, dtype=torch.long, device=parameter.device)
    conditioning = {}
    if type(loaded.model).__name__ == "UNet2DConditionModel" and has_cross_attention(loaded.model):
        width = loaded.model.config.cross_attention_dim
        width = int(width[0] if isinstance(width, (list, tuple)) else width)
        length = int(loaded.extras.get("context_length") or 77)
        context = torch.randn((batch_size, length, width), generator=generator)
        conditioning["encoder_hidden_states"] = context.to(parameter.device, parameter.dtype)
    if loaded.extras.get("conditioning") == "class":
        conditioning["class_labels"] = torch.zeros(batch_size, dtype=torch.long, device=parameter.device)
    return (sample, timesteps, conditioning) if conditioning else (sample, timesteps)


def predict(loaded: LoadedModel, sample, timesteps, conditioning=None):
    """The UNet's prediction; a learned-variance output (2x channels) is cut to the prediction part."""
    conditioning = conditioning or {}
    model = loaded.model
    extra = {"class_labels": conditioning["class_labels"]} if "class_labels" in conditioning else {}
    if type(model).__name__ == "UNet2DConditionModel":
        out = model(sample, timesteps, conditioning.get("encoder_hidden_states"), return_dict=False, **extra)[
            0
        ]
    else:
        out = model(sample, timesteps, return_dict=False, **extra)[0]
    if out.shape[1] == 2 * sample.shape[1]:
        out = out[:, : sample.shape[1]]
    return out


def data_size(loaded: LoadedModel) -> int:
    require_autoencoder(loaded)
    return loaded.sample_size * loaded.extras["vae_scale_factor"]


def data_channels(loaded: LoadedModel) -> int:
    return int(require_autoencoder(loaded).config.in_channels)


def encode_images(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to scaled latents: the posterior mean (KL) or the unquantised latents (VQ)."""
    vae = require_autoencoder(loaded)
    extras = loaded.extras
    device, dtype = _device(vae), next(vae.parameters()).dtype
    chunk = max(1, PIXELS_PER_CHUNK // (images.shape[-1] * images.shape[-2]))
    latents = []
    with torch.no_grad():
        for start in range(0, images.shape[0], chunk):
            batch = images[start : start + chunk].to(device, dtype)
            encoded = vae.encode(batch)
            latents.append(encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents)
    latents = torch.cat(latents)
    if extras.get("shift_factor") is not None:
        latents = latents - extras["shift_factor"]
    return latents * extras["scaling_factor"]


def decode(loaded: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to images in [-1, 1] (VQ latents are quantised first, as in the LDM code)."""
    vae = require_autoencoder(loaded)
    extras = loaded.extras
    device, dtype = _device(vae), next(vae.parameters()).dtype
    latents = latents / extras["scaling_factor"]
    if extras.get("shift_factor") is not None:
        latents = latents + extras["shift_factor"]
    pixels = (latents.shape[-1] * extras["vae_scale_factor"]) ** 2
    chunk = max(1, PIXELS_PER_CHUNK // pixels)
    images = []
    with torch.no_grad():
        for start in range(0, latents.shape[0], chunk):
            images.append(vae.decode(latents[start : start + chunk].to(device, dtype)).sample.float())
    return torch.cat(images).clamp(-1, 1).to(latents.device)


def encode_prompts(loaded: LoadedModel, prompts: list[str]) -> torch.Tensor:
    """CLIP hidden states for ``prompts``, each distinct prompt encoded once, without gradients."""
    text_encoder = loaded.components["text_encoder"]
    tokenizer = loaded.components.get("tokenizer")
    if tokenizer is None:
        raise BadInput(
            f"{loaded.source} has no tokenizer, so prompts cannot be encoded: put a CLIP tokenizer folder "
            "(vocab.json, merges.txt) named tokenizer/ beside the checkpoint"
        )
    distinct = list(dict.fromkeys(prompts))
    tokens = tokenizer(
        distinct,
        padding="max_length",
        max_length=loaded.extras["context_length"],
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(_device(text_encoder))
    with torch.no_grad():
        states = torch.cat([text_encoder(tokens[i : i + 16])[0] for i in range(0, len(distinct), 16)])
    order = torch.tensor([distinct.index(p) for p in prompts], device=states.device)
    return states[order]


def _class_context(loaded: LoadedModel, labels: torch.Tensor) -> torch.Tensor:
    embedder = loaded.components["class_embedder"]
    with torch.no_grad():
        return embedder(labels.to(embedder.weight.device))[:, None, :]


def _conditioning_for(
    loaded: LoadedModel, labels: torch.Tensor | None, prompts: list[str] | None
) -> dict | None:
    """Positive conditioning tensors on the UNet's device."""
    kind = loaded.extras["conditioning"]
    parameter = next(loaded.model.parameters())
    if kind == "text":
        return {
            "encoder_hidden_states": encode_prompts(loaded, prompts).to(parameter.device, parameter.dtype)
        }
    if kind == "class":
        return {"class_labels": labels.to(parameter.device)}
    if kind == "class-context":
        return {"encoder_hidden_states": _class_context(loaded, labels).to(parameter.device, parameter.dtype)}
    return None


def _refuse_missing(loaded: LoadedModel) -> None:
    if loaded.extras["conditioning"] == "missing":
        raise BadInput(
            f"the UNet of {loaded.source} expects a cross-attention context, but no text encoder or class "
            "embedder was loaded with it; point dp at the whole pipeline folder"
        )


def prepare_batch(loaded: LoadedModel, images, files=None, root=None, prompt=None):
    """Encode calibration images once; conditioning from --prompt, captions or class sub-folders."""
    from dpcli import conditioning

    _refuse_missing(loaded)
    kind = loaded.extras["conditioning"]
    if prompt is not None and kind != "text":
        raise BadInput(f"--prompt applies to text-conditional models; {loaded.source} is not one")
    latents = encode_images(loaded, images)
    labels = prompts = None
    if kind == "text":
        prompts = (
            [prompt] * len(images) if prompt is not None else conditioning.captions(files, root, len(images))
        )
    elif kind in ("class", "class-context"):
        labels = conditioning.class_labels(files, root, loaded.extras["num_classes"])
    parameter = next(loaded.model.parameters())
    return latents.to(parameter.device, parameter.dtype), _conditioning_for(loaded, labels, prompts)


def sampling_conditioning(
    loaded: LoadedModel,
    batch_size: int,
    generator=None,
    prompt=None,
    negative_prompt=None,
    class_labels=None,
    **_,
):
    """Conditioning for sampling, with the unconditional counterpart under ``negative_*`` keys when one exists.

    Text models: ``prompt`` (one string or one per sample; default the empty prompt) and ``negative_prompt``
    (default empty). Class models: ``class_labels`` (an int, or one per sample; default random from
    ``generator``); the unconditional class is used for guidance where the model has one.
    """
    _refuse_missing(loaded)
    kind = loaded.extras["conditioning"]
    if kind != "text" and (prompt is not None or negative_prompt is not None):
        raise BadInput(f"prompts apply to text-conditional models; {loaded.source} is not one")
    if kind not in ("class", "class-context") and class_labels is not None:
        raise BadInput(f"class labels apply to class-conditional models; {loaded.source} is not one")
    if kind == "text":
        positive = _per_sample(prompt if prompt is not None else "", batch_size, "prompt")
        negative = _per_sample(
            negative_prompt if negative_prompt is not None else "", batch_size, "negative prompt"
        )
        conditioning = _conditioning_for(loaded, None, positive)
        conditioning["negative_encoder_hidden_states"] = _conditioning_for(loaded, None, negative)[
            "encoder_hidden_states"
        ]
        return conditioning
    if kind in ("class", "class-context"):
        labels = _sampling_labels(loaded, batch_size, class_labels, generator)
        conditioning = _conditioning_for(loaded, labels, None)
        null_class = loaded.extras.get("null_class")
        if null_class is not None:
            negatives = _conditioning_for(loaded, torch.full_like(labels, int(null_class)), None)
            conditioning.update({f"negative_{key}": value for key, value in negatives.items()})
        return conditioning
    return None


def _per_sample(value, batch_size: int, what: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch_size
    values = list(value)
    if len(values) == 1:
        return values * batch_size
    if len(values) != batch_size:
        raise BadInput(f"got {len(values)} values for the {what}, expected 1 or {batch_size}")
    return values


def _sampling_labels(loaded: LoadedModel, batch_size: int, class_labels, generator) -> torch.Tensor:
    classes = int(loaded.extras["num_classes"])
    if class_labels is None:
        return torch.randint(0, classes, (batch_size,), generator=generator)
    values = (
        [int(class_labels)] * batch_size if isinstance(class_labels, int) else [int(v) for v in class_labels]
    )
    if len(values) == 1:
        values = values * batch_size
    if len(values) != batch_size:
        raise BadInput(f"got {len(values)} class labels, expected 1 or {batch_size}")
    wrong = [v for v in values if not 0 <= v < classes]
    if wrong:
        raise BadInput(
            f"class label {wrong[0]} is out of range: the model has {classes} classes (0..{classes - 1})"
        )
    return torch.tensor(values, dtype=torch.long)


def denoise(loaded: LoadedModel, sample, timesteps, conditioning=None, guidance_scale: float = 1.0):
    """The prediction to step with: classifier-free guidance uncond + s·(cond − uncond) when s ≠ 1."""
    conditioning = conditioning or {}
    positive = {k: v for k, v in conditioning.items() if not k.startswith("negative_")}
    if guidance_scale == 1.0 or not positive:
        return predict(loaded, sample, timesteps, positive)
    negative = {k[len("negative_") :]: v for k, v in conditioning.items() if k.startswith("negative_")}
    if set(negative) != set(positive):
        raise BadInput(
            f"{loaded.source} has no unconditional input (no null class or empty prompt): classifier-free "
            "guidance is not possible; use guidance scale 1"
        )
    both = {key: torch.cat([negative[key], positive[key]]) for key in positive}
    timesteps = torch.as_tensor(timesteps, device=sample.device)
    if timesteps.dim() > 0 and timesteps.shape[0] == sample.shape[0]:
        timesteps = torch.cat([timesteps, timesteps])
    unconditional, conditional = predict(loaded, torch.cat([sample, sample]), timesteps, both).chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def pruner_options(loaded: LoadedModel) -> dict:
    from dpcli.adapters.diffusers_fixes import pruning_options

    if getattr(loaded.model, "is_gradient_checkpointing", False):
        loaded.model.disable_gradient_checkpointing()  # its wrappers hide blocks from the dependency graph
    return pruning_options(loaded.model)


# Saving -----------------------------------------------------------------------------------------------
def save_latent(loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
    """The dpcli format for the UNet (dpcli.json, unet/, scheduler/) plus the untouched components, each in
    its own sub-folder in its library's own format (safetensors)."""
    from safetensors.torch import save_file

    from dpcli.io.model_format import save_model

    folder = Path(folder)
    described = {}
    for name, component in loaded.components.items():
        path = folder / name
        if name == "class_embedder":
            path.mkdir(parents=True, exist_ok=True)
            save_file(
                {"weight": component.weight.detach().contiguous().cpu()}, str(path / CLASS_EMBEDDER_FILE)
            )
            library = "torch"
        elif name == "tokenizer":
            component.save_pretrained(str(path))
            library = "transformers"
        else:
            component.save_pretrained(str(path), safe_serialization=True)
            library = type(component).__module__.split(".")[0]
        described[name] = {"class": type(component).__name__, "library": library, "path": name}
    latent = {k: v for k, v in loaded.extras.items() if isinstance(v, (int, float, str, type(None)))}
    return save_model(loaded, folder, {**metadata, "components": described, "latent": latent})
