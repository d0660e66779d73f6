"""The ``ldm`` adapter's hooks: inputs, prediction, encoding and decoding, conditioning, guidance."""

from __future__ import annotations

import torch

from dpcli.adapters.base import LoadedModel
from dpcli.adapters.latent.facts import _device, has_cross_attention, require_autoencoder
from dpcli.adapters.latent.sdxl import added_cond_kwargs, example_added, is_sdxl, text_conditioning
from dpcli.errors import BadInput, BadSetting

# Images encoded (or latents decoded) per autoencoder call: about 2 images of 512x512 at a time.
PIXELS_PER_CHUNK = 2**19


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
    if is_sdxl(loaded.model):
        target = loaded.sample_size * int(loaded.extras.get("vae_scale_factor") or 8)
        conditioning.update(
            example_added(loaded.model, batch_size, target, generator, parameter.device, parameter.dtype)
        )
    return (sample, timesteps, conditioning) if conditioning else (sample, timesteps)


def predict(loaded: LoadedModel, sample, timesteps, conditioning=None):
    """The UNet's prediction; a learned-variance output (2x channels) is cut to the prediction part."""
    conditioning = conditioning or {}
    model = loaded.model
    extra = {"class_labels": conditioning["class_labels"]} if "class_labels" in conditioning else {}
    added = added_cond_kwargs(conditioning)
    if added is not None:
        extra["added_cond_kwargs"] = added
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
    loaded: LoadedModel,
    labels: torch.Tensor | None,
    prompts: list[str] | None,
    geometry=None,
    text_cache=None,
    zeros: bool = False,
) -> dict | None:
    """Positive conditioning tensors on the UNet's device (SDXL: with pooled embeddings and time ids)."""
    kind = loaded.extras["conditioning"]
    parameter = next(loaded.model.parameters())
    if kind == "text" and loaded.extras.get("added_conditioning"):
        target = loaded.sample_size * int(loaded.extras["vae_scale_factor"])
        return text_conditioning(loaded, prompts, target, geometry, text_cache, zeros)
    if kind == "text":
        return {
            "encoder_hidden_states": encode_prompts(loaded, prompts).to(parameter.device, parameter.dtype)
        }
    if kind == "class":
        return {"class_labels": labels.to(parameter.device)}
    if kind == "class-context":
        return {"encoder_hidden_states": _class_context(loaded, labels).to(parameter.device, parameter.dtype)}
    return None


def refuse_missing_conditioning(loaded: LoadedModel) -> None:
    if loaded.extras["conditioning"] == "missing":
        raise BadInput(
            f"the UNet of {loaded.source} expects a cross-attention context, but no text encoder or class "
            "embedder was loaded with it; point dp at the whole pipeline folder"
        )


def prepare_batch(loaded: LoadedModel, images, context):
    """Encode the images (unless ``context.latents`` holds them); conditioning from ``context.prompt``,
    the rows' captions or their class labels."""
    refuse_missing_conditioning(loaded)
    kind = loaded.extras["conditioning"]
    prompt = context.prompt
    if prompt is not None and kind != "text":
        raise BadSetting(
            "prompt", "{prompt} applies to text-conditional models; {source} is not one", source=loaded.source
        )
    latents = context.latents if context.latents is not None else encode_images(loaded, images)
    count = latents.shape[0]
    labels = prompts = None
    if kind == "text":
        prompts = [prompt] * count if prompt is not None else (context.captions or [""] * count)
    elif kind in ("class", "class-context"):
        if context.labels is None:
            raise BadSetting(
                "data",
                "class-conditional models need class labels: give {data} a folder with one sub-folder per "
                "class, a dataset with a label column, or shards with .cls members",
            )
        labels = context.labels
    parameter = next(loaded.model.parameters())
    conditioning = _conditioning_for(loaded, labels, prompts, context.geometry, context.text_cache)
    return latents.to(parameter.device, parameter.dtype), conditioning


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
    refuse_missing_conditioning(loaded)
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
        # diffusers' SDXL pipeline: no negative prompt means all-zero embeddings (force_zeros_for_empty_prompt)
        zeros = negative_prompt is None and bool(loaded.extras.get("force_zeros_for_empty_prompt"))
        negatives = _conditioning_for(loaded, None, negative, zeros=zeros)
        conditioning.update({f"negative_{key}": value for key, value in negatives.items()})
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
