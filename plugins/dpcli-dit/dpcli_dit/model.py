"""Loading, running, pruning glue and saving for diffusers DiT models (the ``dit`` adapter's machinery).

What is pruned: attention heads (``--head-ratio``) and the width inside heads (to_q/to_k/to_v outputs,
to_out inputs), and the MLP hidden width (the feed-forward's first projection and the second one's
inputs). The residual width is shared by the patch embedding, every adaLN-Zero modulation (chunked six
ways) and the output layer, so it is left whole: every other linear/conv/embedding is ignored.

Pixel or latent: a DiT loaded with an ``AutoencoderKL`` (a pipeline folder with ``vae/``, or a dpcli
folder saved from one) works on latents: calibration images are encoded (posterior mean × scaling
factor) and samples decoded. Without a VAE the DiT works on pixels (1 or 3 input channels).

Conditioning: a dict ``{"class_labels": LongTensor}``. Calibration and fine-tuning images carry their
class labels from the data layer (class sub-folders, a label column, ``.cls`` shard members); data without
labels is refused before any work, rather than silently training only the null class (index
``num_embeds_ada_norm``, the label classifier-free guidance drops to). Sampling takes one label per sample
(``dp eval --class-label``, else every class in turn) and guides against the null class (default scale 4.0,
as DiTPipeline).

``DiTAdapter`` (at the end) is the adapter class; ``dpcli_dit.plugin`` registers it lazily.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch

from dpcli.adapters.base import (
    BatchContext,
    ConditioningSpec,
    DiffusersAdapter,
    LoadedModel,
    ModelSource,
    no_prompt,
    random_class_labels,
)
from dpcli.errors import BadInput
from dpcli.io.diffusers_files import default_scheduler, folder_weights, load_scheduler, load_weights_into
from dpcli.io.files import read_json
from dpcli.io.model_format import load_saved_model, read_metadata, save_model

CONFIGS = Path(__file__).resolve().parent / "configs"
DIT_CLASS = "DiTTransformer2DModel"
DEFAULT_SCHEDULER_NOTE = (
    "diffusers DDPMScheduler defaults (1000 steps, linear betas 1e-4..0.02, as DiT trains)"
)
PIXEL_CHANNELS = (1, 3)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def is_dit_config(config: dict | None) -> bool:
    """A DiTTransformer2DModel config, or the ``Transformer2DModel`` one older DiT checkpoints carry
    (adaLN-Zero with patches: diffusers maps those to DiTTransformer2DModel, and so do we)."""
    if not isinstance(config, dict):
        return False
    name = config.get("_class_name")
    if name == DIT_CLASS:
        return True
    return (
        name == "Transformer2DModel"
        and config.get("norm_type") == "ada_norm_zero"
        and config.get("patch_size") is not None
    )


def detect(source: ModelSource) -> float:
    """1 for a dpcli folder saved by this adapter and built-in DiT configs; 0.9 for diffusers DiT folders."""
    if source.kind == "builtin":
        return 1.0 if source.spec.split(":", 1)[1] in builtin_names() else 0.0
    if source.path is None:
        return 0.0
    if source.kind in ("folder", "hub"):
        saved = read_metadata(source.path)
        if saved is not None:
            return 1.0 if saved.get("adapter") == "dit" else 0.0
        index = source.read_json("model_index.json")
        if index is not None:
            return (
                0.9
                if "transformer" in index and is_dit_config(source.read_json("transformer/config.json"))
                else 0.0
            )
        return 0.9 if is_dit_config(source.read_json("config.json")) else 0.0
    if source.suffix == ".json":
        try:
            return 0.8 if is_dit_config(json.loads(source.path.read_text())) else 0.0
        except (OSError, ValueError):
            return 0.0
    return 0.0


def read_config(path: Path) -> dict:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise BadInput(f"no config.json at {path}")
    config = read_json(file)
    if not is_dit_config(config):
        raise BadInput(f"{file} does not describe a {DIT_CLASS} (class {config.get('_class_name')!r})")
    return config


def build_dit(config: dict, seed: int | None = 0) -> torch.nn.Module:
    """A DiTTransformer2DModel from a config dict (keys it does not take are dropped), seeded weights."""
    from diffusers import DiTTransformer2DModel

    accepted = set(inspect.signature(DiTTransformer2DModel.__init__).parameters) - {"self"}
    arguments = {k: v for k, v in config.items() if k in accepted}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return DiTTransformer2DModel(**arguments).eval()
        except (TypeError, ValueError, KeyError, NotImplementedError) as exc:
            raise BadInput(f"invalid {DIT_CLASS} config: {exc}") from None


def base_config(model: torch.nn.Module) -> dict:
    """The model's config as diffusers would save it (class name included, private keys dropped)."""
    return {
        "_class_name": DIT_CLASS,
        **{k: v for k, v in dict(model.config).items() if not k.startswith("_")},
    }


def load_vae(folder: Path):
    """The AutoencoderKL in ``folder`` (config.json + weights), read with dp's safe loaders."""
    from diffusers import AutoencoderKL

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read the VAE config in {folder}: {exc}") from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise BadInput(
            f"{folder}: the dit adapter supports an AutoencoderKL VAE, not {config['_class_name']}"
        )
    try:
        vae = AutoencoderKL.from_config(config).eval()
    except (TypeError, ValueError, KeyError) as exc:
        raise BadInput(f"invalid AutoencoderKL config in {folder}: {exc}") from None
    load_weights_into(vae, folder_weights(folder), str(folder))
    vae.requires_grad_(False)
    return vae


def load(source: ModelSource, adapter_name: str, config_path: Path | None = None) -> LoadedModel:
    """Load a DiT from a built-in config, a diffusers model or pipeline folder, a config file or a dpcli folder."""
    notes: list[str] = []
    scheduler, scheduler_origin, vae = None, DEFAULT_SCHEDULER_NOTE, None
    if source.kind == "builtin":
        config = read_config(CONFIGS / f"{source.spec.split(':', 1)[1]}.json")
        model = build_dit(config)
        source_kind = "built-in DiT config, random weights"
        notes.append("architecture only: weights are random (seed 0)")
    elif source.kind in ("folder", "hub") and read_metadata(source.path) is not None:
        return load_saved(source, adapter_name)
    elif source.kind in ("folder", "hub"):
        folder = source.path
        hub = " (Hub cache)" if source.kind == "hub" else ""
        if (folder / "model_index.json").is_file():
            folder = source.path / "transformer"
            if (source.path / "scheduler" / "scheduler_config.json").is_file():
                scheduler = load_scheduler(source.path / "scheduler")
                scheduler_origin = f"{type(scheduler).__name__} from the pipeline"
            if (source.path / "vae" / "config.json").is_file():
                vae = load_vae(source.path / "vae")
            source_kind = "diffusers DiT pipeline" + hub
        else:
            source_kind = "diffusers DiT model folder" + hub
        model = build_dit(read_config(config_path or folder))
        load_weights_into(model, folder_weights(folder), str(folder))
    elif source.suffix == ".json":
        model = build_dit(read_config(source.path))
        source_kind = "DiT config file, random weights"
        notes.append("architecture only: weights are random (seed 0)")
    else:
        raise BadInput(
            f"{source.spec}: the dit adapter reads DiT model or pipeline folders, config files and dpcli folders"
        )
    return _loaded(model, adapter_name, source, source_kind, scheduler, scheduler_origin, vae, notes)


def load_saved(source: ModelSource, adapter_name: str) -> LoadedModel:
    """A DiT written by dp (pruned and/or fine-tuned): rebuilt from base config + saved shapes, no pickle."""
    from dpcli.adapters.diffusers_fixes import fix_attributes

    model, info = load_saved_model(source.path, build_dit, fix_attributes)
    scheduler, origin = default_scheduler(), DEFAULT_SCHEDULER_NOTE
    if (source.path / "scheduler" / "scheduler_config.json").is_file():
        scheduler = load_scheduler(source.path / "scheduler")
        origin = f"{type(scheduler).__name__} saved with the model"
    vae = load_vae(source.path / "vae") if (source.path / "vae" / "config.json").is_file() else None
    pruned = info.get("pruning") is not None
    kind = "dpcli pruned DiT" if pruned else "dpcli DiT"
    loaded = _loaded(model, adapter_name, source, kind, scheduler, origin, vae, [])
    loaded.record = info
    return loaded


def _loaded(model, adapter_name, source, source_kind, scheduler, scheduler_origin, vae, notes) -> LoadedModel:
    config = base_config(model)
    in_channels = int(config["in_channels"])
    if vae is None and in_channels not in PIXEL_CHANNELS:
        notes.append(
            f"latent DiT ({in_channels} channels) without its VAE: inspect and data-free pruning work; "
            "scoring with data and sampling need the pipeline folder (with vae/)"
        )
    return LoadedModel(
        model=model,
        adapter_name=adapter_name,
        source=source.spec,
        source_kind=source_kind,
        config=config,
        sample_size=int(config["sample_size"]),
        in_channels=in_channels,
        scheduler=scheduler or default_scheduler(),
        scheduler_origin=scheduler_origin,
        components={"vae": vae} if vae is not None else {},
        notes=notes,
    )


# Running ------------------------------------------------------------------------------------------


def null_class(loaded: LoadedModel) -> int:
    """The label classifier-free guidance drops to (DiT's label table has one row more than classes)."""
    return int(loaded.model.config.num_embeds_ada_norm)


def _device(loaded: LoadedModel) -> torch.device:
    return next(loaded.model.parameters()).device


def _class_labels(loaded: LoadedModel, conditioning, batch: int, device) -> torch.Tensor:
    labels = conditioning.get("class_labels") if isinstance(conditioning, dict) else conditioning
    if labels is None:
        return torch.full((batch,), null_class(loaded), dtype=torch.long, device=device)
    return torch.as_tensor(labels).to(device=device, dtype=torch.long)


def _batch_timesteps(timesteps, batch: int, device) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=device)
    return timesteps.expand(batch) if timesteps.dim() == 0 else timesteps


def example_inputs(loaded: LoadedModel, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy sample and timesteps at the native size (the class defaults to the null class)."""
    parameter = next(loaded.model.parameters())
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, loaded.in_channels, loaded.sample_size, loaded.sample_size)
    sample = torch.randn(shape, generator=generator)
    timesteps = torch.full((batch_size,), 10, dtype=torch.long)
    return sample.to(parameter.device, parameter.dtype), timesteps.to(parameter.device)


def predict(loaded: LoadedModel, sample, timesteps, conditioning=None) -> torch.Tensor:
    """The noise prediction; a learned-sigma DiT's variance channels are split off (DiTPipeline does the same)."""
    batch = sample.shape[0]
    labels = _class_labels(loaded, conditioning, batch, sample.device)
    output = loaded.model(
        sample,
        timestep=_batch_timesteps(timesteps, batch, sample.device),
        class_labels=labels,
        return_dict=False,
    )[0]
    channels = sample.shape[1]
    return output[:, :channels] if output.shape[1] == 2 * channels else output


def denoise(loaded: LoadedModel, sample, timesteps, conditioning=None, guidance_scale: float = 1.0):
    """Classifier-free guidance against the null class when ``guidance_scale`` > 1."""
    if guidance_scale == 1.0 or conditioning is None:
        return predict(loaded, sample, timesteps, conditioning)
    batch = sample.shape[0]
    labels = _class_labels(loaded, conditioning, batch, sample.device)
    timesteps = _batch_timesteps(timesteps, batch, sample.device)
    both = predict(
        loaded,
        torch.cat([sample, sample]),
        torch.cat([timesteps, timesteps]),
        {"class_labels": torch.cat([labels, torch.full_like(labels, null_class(loaded))])},
    )
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def conditioning_spec(loaded: LoadedModel) -> ConditioningSpec:
    """Class labels ``0..num_embeds_ada_norm-1``, guided against the null class at 4.0 (DiTPipeline's default)."""
    return ConditioningSpec(
        "class", num_classes=null_class(loaded), default_guidance_scale=4.0, guidance=True
    )


def sampling_conditioning(
    loaded: LoadedModel, batch_size: int, generators: list[torch.Generator] | None = None, **options
) -> dict:
    """``{"class_labels": ...}``: ``class_labels=[...]`` repeated to the batch, else one random class per
    sample, drawn from that sample's generator."""
    if options.get("prompt"):
        raise BadInput("DiT models are class-conditional: give class labels, not a prompt")
    classes = null_class(loaded)
    given = options.get("class_labels")
    if given is None:
        labels = random_class_labels(generators or [None] * batch_size, classes)
    else:
        labels = torch.as_tensor(given, dtype=torch.long).flatten()
        if labels.numel() == 0 or bool(((labels < 0) | (labels >= classes)).any()):
            raise BadInput(f"class labels must be in [0, {classes}), got {labels.tolist()}")
        labels = labels.repeat(math.ceil(batch_size / labels.numel()))[:batch_size]
    return {"class_labels": labels.to(_device(loaded))}


def _vae(loaded: LoadedModel, what: str):
    vae = loaded.components.get("vae")
    if vae is None and loaded.in_channels not in PIXEL_CHANNELS:
        raise BadInput(f"{what} needs the VAE of this latent DiT: load its pipeline folder (with vae/)")
    return vae


def decode(loaded: LoadedModel, sample) -> torch.Tensor:
    vae = _vae(loaded, "decoding samples")
    if vae is None:
        return sample.clamp(-1, 1)
    vae.to(sample.device)
    with torch.no_grad():
        images = vae.decode(sample.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.clamp(-1, 1)


def data_size(loaded: LoadedModel) -> int:
    vae = _vae(loaded, "calibration data")
    if vae is None:
        return loaded.sample_size
    return loaded.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)


def data_channels(loaded: LoadedModel) -> int:
    vae = _vae(loaded, "calibration data")
    return loaded.in_channels if vae is None else int(vae.config.in_channels)


def encode_images(loaded: LoadedModel, images) -> torch.Tensor | None:
    """The VAE's posterior mean × scaling factor (what the latent cache keeps); None for a pixel DiT."""
    vae = _vae(loaded, "calibration data")
    if vae is None:
        return None
    parameter = next(loaded.model.parameters())
    vae.to(parameter.device)
    with torch.no_grad():
        posterior = vae.encode(images.to(parameter.device, vae.dtype)).latent_dist
        return (posterior.mode() * vae.config.scaling_factor).to(parameter.dtype)


def autoencoder(loaded: LoadedModel):
    """The VAE ``encode_images`` runs (its weights key ``--cache-latents``), or None for a pixel DiT."""
    return _vae(loaded, "calibration data")


def prepare_batch(loaded: LoadedModel, images, context: BatchContext):
    """``(x0, {"class_labels": context.labels})``: pixels as they are, or latents (``context.latents`` from
    the cache, else ``encode_images``). Labels are required: ``check_data`` refused unlabelled data."""
    if context.prompt is not None:
        raise no_prompt(loaded.adapter_name)
    if context.labels is None:
        raise BadInput(
            f"{loaded.source} is class-conditional: its calibration and fine-tuning data need labels"
        )
    parameter = next(loaded.model.parameters())
    if context.latents is not None:
        x0 = context.latents
    else:
        x0 = encode_images(loaded, images)
        if x0 is None:
            x0 = images
    labels = torch.as_tensor(context.labels, dtype=torch.long, device=parameter.device)
    return x0.to(parameter.device, parameter.dtype), {"class_labels": labels}


# Pruning and saving -------------------------------------------------------------------------------


def prunable_layers(model: torch.nn.Module) -> set[torch.nn.Module]:
    """The layers whose outputs may shrink: q/k/v projections and each MLP's first projection."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    chosen: set[torch.nn.Module] = set()
    for module in model.modules():
        if isinstance(module, Attention):
            chosen.update(p for p in (module.to_q, module.to_k, module.to_v) if p is not None)
        elif isinstance(module, FeedForward):
            chosen.add(module.net[0].proj)
    return chosen


def ignored_layers(loaded: LoadedModel) -> list[torch.nn.Module]:
    """Every other linear, conv and embedding: they write the residual stream (or the adaLN
    modulations chunked from it), whose width must stay. Their inputs may still shrink."""
    keep = prunable_layers(loaded.model)
    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.Embedding)
    return [m for m in loaded.model.modules() if isinstance(m, kinds) and m not in keep]


def save(loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
    """The dpcli format (safetensors + dpcli.json, see dpcli.io.model_format), plus ``vae/`` for latent models."""
    vae = loaded.components.get("vae")
    if vae is not None:
        metadata = {**metadata, "components": {"vae": type(vae).__name__}}
    info = save_model(loaded, folder, metadata, base_config=base_config(loaded.model))
    if vae is not None:
        vae.save_pretrained(Path(folder) / "vae", safe_serialization=True)
    return info


class DiTAdapter(DiffusersAdapter):
    """diffusers ``DiTTransformer2DModel``: class-conditional, pixel or latent (with its VAE)."""

    example_inputs = staticmethod(example_inputs)
    predict = staticmethod(predict)
    conditioning_spec = staticmethod(conditioning_spec)
    sampling_conditioning = staticmethod(sampling_conditioning)
    denoise = staticmethod(denoise)
    decode = staticmethod(decode)
    data_size = staticmethod(data_size)
    data_channels = staticmethod(data_channels)
    prepare_batch = staticmethod(prepare_batch)
    encode_images = staticmethod(encode_images)
    autoencoder = staticmethod(autoencoder)
    ignored_layers = staticmethod(ignored_layers)
    save = staticmethod(save)

    def load(self, source: ModelSource, config: Path | None = None) -> LoadedModel:
        return load(source, self.name, config)
