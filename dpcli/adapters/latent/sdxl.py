"""SDXL: ``UNet2DConditionModel`` with added ``text_time`` conditioning and two text encoders.

The UNet takes, besides the latents, the timestep and the cross-attention context (the penultimate hidden
states of both CLIP text encoders, concatenated), ``added_cond_kwargs``: ``text_embeds`` (the pooled,
projected output of the second encoder) and ``time_ids``, six numbers per image: the original image size
(height, width), the top-left corner of the crop (top, left) and the target size (height, width), as
diffusers' ``train_text_to_image_sdxl.py`` computes them. Inside the UNet the time ids are embedded
(``add_time_proj``), concatenated with ``text_embeds`` (together ``projection_class_embeddings_input_dim``
wide, 2816 for SDXL) and projected by ``add_embedding``, whose output is added to ``time_embedding``'s.

A conditioning dict of an SDXL model has the keys ``encoder_hidden_states``, ``text_embeds`` and
``time_ids`` (with ``negative_`` twins for guidance), so guidance and batching treat them like any other.
"""

from __future__ import annotations

import torch

from dpcli.errors import BadInput

ADDED_CONDITIONING = "text_time"
TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)
ADDED_KEYS = ("text_embeds", "time_ids")
# diffusers' StableDiffusionXLPipeline samples with guidance 5.0 unless told otherwise.
SDXL_GUIDANCE_SCALE = 5.0
REFINER_REFUSAL = (
    "the SDXL refiner (one text encoder, aesthetic-score time ids) is not supported: prune and fine-tune "
    "the SDXL base model, and keep the refiner as it is"
)


def is_sdxl(unet) -> bool:
    """Whether ``unet`` takes SDXL's added ``text_time`` conditioning."""
    return getattr(unet.config, "addition_embed_type", None) == ADDED_CONDITIONING


def added_widths(unet) -> tuple[int, int]:
    """(width of ``text_embeds``, width of one embedded time id) from the UNet config."""
    config = unet.config
    time_width = int(config.addition_time_embed_dim)
    total = int(config.projection_class_embeddings_input_dim)
    return total - TIME_IDS * time_width, time_width


def check_unet(unet) -> None:
    """Refuse an added-conditioning config SDXL's six time ids cannot fill."""
    config = unet.config
    if config.addition_time_embed_dim is None or config.projection_class_embeddings_input_dim is None:
        raise BadInput(
            "the UNet's text_time conditioning needs addition_time_embed_dim and "
            "projection_class_embeddings_input_dim in its config"
        )
    pooled, _ = added_widths(unet)
    if pooled <= 0:
        raise BadInput(
            f"the UNet's added conditioning is {config.projection_class_embeddings_input_dim} wide, too "
            f"narrow for {TIME_IDS} time ids of {config.addition_time_embed_dim}"
        )


def check_encoders(unet, components: dict) -> None:
    """The two text encoders must fit the UNet: hidden sizes summing to the cross-attention width and a
    pooled projection as wide as ``text_embeds``; a refiner (one encoder, five time ids) is refused."""
    first, second = components.get("text_encoder"), components.get("text_encoder_2")
    if second is None:
        if first is not None:
            raise BadInput("an SDXL UNet needs two text encoders (text_encoder and text_encoder_2)")
        return
    pooled, time_width = added_widths(unet)
    projection = int(getattr(second.config, "projection_dim", 0) or 0)
    if first is None:
        if projection and projection + (TIME_IDS - 1) * time_width == int(
            unet.config.projection_class_embeddings_input_dim
        ):
            raise BadInput(REFINER_REFUSAL)
        raise BadInput("an SDXL UNet needs two text encoders (text_encoder and text_encoder_2)")
    if projection != pooled:
        if projection + (TIME_IDS - 1) * time_width == int(unet.config.projection_class_embeddings_input_dim):
            raise BadInput(REFINER_REFUSAL)
        raise BadInput(
            f"text_encoder_2 projects to {projection}, but the UNet's added conditioning expects "
            f"text_embeds of width {pooled}"
        )
    width = int(first.config.hidden_size) + int(second.config.hidden_size)
    cross = unet.config.cross_attention_dim
    cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
    if width != cross:
        raise BadInput(
            f"the text encoders' hidden states are {width} wide together, the UNet's cross-attention {cross}"
        )


def time_ids(
    original_sizes, crops_top_left, target_size: int, count: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``[count, 6]``: (original h, w, crop top, left, target h, w) per image. Without per-image sizes
    (sampling, or data that does not say) the image is taken as uncropped at the target size."""
    rows = []
    for row in range(count):
        original = tuple(original_sizes[row]) if original_sizes is not None else (target_size, target_size)
        crop = tuple(crops_top_left[row]) if crops_top_left is not None else (0, 0)
        rows.append([*original, *crop, target_size, target_size])
    return torch.tensor(rows, dtype=dtype, device=device)


def example_added(unet, batch_size: int, target_size: int, generator, device, dtype) -> dict:
    """Random ``text_embeds`` and uncropped ``time_ids`` of the right shapes (scoring's example inputs)."""
    pooled, _ = added_widths(unet)
    text_embeds = torch.randn((batch_size, pooled), generator=generator).to(device, dtype)
    ids = time_ids(None, None, target_size, batch_size, device, dtype)
    return {"text_embeds": text_embeds, "time_ids": ids}


def added_cond_kwargs(conditioning: dict) -> dict | None:
    """``added_cond_kwargs`` for the UNet from a conditioning dict (None when it has neither key)."""
    if not any(key in conditioning for key in ADDED_KEYS):
        return None
    missing = [key for key in ADDED_KEYS if key not in conditioning]
    if missing:
        raise BadInput(f"SDXL conditioning without {missing[0]}")
    return {key: conditioning[key] for key in ADDED_KEYS}


# Text: two encoders ------------------------------------------------------------------------------------

ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
TEXT_CACHE_FORMAT = 1


def _encode(loaded, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate hidden states concatenated, and the second's pooled projection, as
    diffusers' ``StableDiffusionXLPipeline.encode_prompt`` computes them (no gradients)."""
    hidden, pooled = [], None
    for tokenizer_name, encoder_name in ENCODERS:
        tokenizer, encoder = loaded.components.get(tokenizer_name), loaded.components[encoder_name]
        if tokenizer is None:
            raise BadInput(
                f"{loaded.source} has no {tokenizer_name}, so prompts cannot be encoded: put the CLIP "
                f"tokenizer folders (vocab.json, merges.txt) named tokenizer/ and tokenizer_2/ beside it"
            )
        device = next(encoder.parameters()).device
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=loaded.extras["context_length"],
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            output = encoder(tokens, output_hidden_states=True)
        hidden.append(output.hidden_states[-2].float())
        pooled = output[0].float()
    return torch.cat([h.to(hidden[0].device) for h in hidden], dim=-1), pooled


def encode_prompts(loaded, prompts: list[str], cache_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder_hidden_states, text_embeds)`` for ``prompts``, each distinct prompt encoded once; with
    ``cache_root`` the pair of every caption is kept on disk (``TextCache``) and read back next time."""
    distinct = list(dict.fromkeys(prompts))
    cache = text_cache(loaded, cache_root) if cache_root is not None else None
    found = {prompt: cache.get(prompt) for prompt in distinct} if cache is not None else {}
    missing = [prompt for prompt in distinct if found.get(prompt) is None]
    for start in range(0, len(missing), 16):
        chunk = missing[start : start + 16]
        hidden, pooled = _encode(loaded, chunk)
        for row, prompt in enumerate(chunk):
            found[prompt] = (hidden[row], pooled[row])
            if cache is not None:
                cache.put(prompt, hidden[row], pooled[row])
    device = next(loaded.components["text_encoder"].parameters()).device
    hidden = torch.stack([found[prompt][0].to(device) for prompt in prompts])
    pooled = torch.stack([found[prompt][1].to(device) for prompt in prompts])
    return hidden, pooled


class TextCache:
    """The text embeddings of captions under ``root/text-<encoders fingerprint>-v1/``, one safetensors
    file per caption (named by its hash), written atomically: on disk, not in RAM."""

    def __init__(self, root, fingerprint: str):
        from pathlib import Path

        self.folder = Path(root) / f"text-{fingerprint[:16]}-v{TEXT_CACHE_FORMAT}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, prompt: str):
        import hashlib

        digest = hashlib.sha256(prompt.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest[2:]}.safetensors"

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self._file(prompt)
        if not file.is_file():
            return None
        try:
            tensors = load_file(file)
            return tensors["encoder_hidden_states"], tensors["text_embeds"]
        except (SafetensorError, OSError, KeyError, ValueError):
            return None

    def put(self, prompt: str, hidden: torch.Tensor, pooled: torch.Tensor) -> None:
        from safetensors.torch import save_file

        from dpcli.io.files import atomic_write

        file = self._file(prompt)
        file.parent.mkdir(exist_ok=True)
        tensors = {
            "encoder_hidden_states": hidden.detach().float().cpu().contiguous(),
            "text_embeds": pooled.detach().float().cpu().contiguous(),
        }
        with atomic_write(file, suffix=".safetensors") as temporary:
            save_file(tensors, str(temporary))


def text_cache(loaded, root) -> TextCache:
    """The text cache of ``loaded``'s encoders and tokenizers under ``root`` (the fingerprint, a hash of
    every encoder weight and the tokenizers' vocabularies, is computed once per model)."""
    key = ("text_cache", str(root))
    if loaded.extras.get("_text_cache_key") != key:
        import hashlib

        from dpcli.jobs.finetune.checkpoints import weights_fingerprint

        digest = hashlib.sha256(str(loaded.extras["context_length"]).encode())
        for tokenizer_name, encoder_name in ENCODERS:
            digest.update(weights_fingerprint(loaded.components[encoder_name]).encode())
            tokenizer = loaded.components.get(tokenizer_name)
            if tokenizer is not None:
                digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
        loaded.extras["_text_cache_key"] = key
        loaded.extras["_text_cache"] = TextCache(root, digest.hexdigest())
    return loaded.extras["_text_cache"]


def text_conditioning(
    loaded, prompts: list[str], target_size: int, geometry=None, cache_root=None, zeros: bool = False
) -> dict:
    """The UNet's conditioning for ``prompts``: hidden states, pooled ``text_embeds`` and ``time_ids``
    from each row's geometry (uncropped at ``target_size`` without one). ``zeros``: the all-zero embeddings
    diffusers' SDXL pipeline uses for an absent negative prompt (``force_zeros_for_empty_prompt``)."""
    if zeros:
        width = sum(int(loaded.components[name].config.hidden_size) for _, name in ENCODERS)
        hidden = torch.zeros(len(prompts), int(loaded.extras["context_length"]), width)
        pooled = torch.zeros(len(prompts), added_widths(loaded.model)[0])
    else:
        hidden, pooled = encode_prompts(loaded, prompts, cache_root)
    parameter = next(loaded.model.parameters())
    sizes = [g.original_size for g in geometry] if geometry is not None else None
    crops = [g.crop_top_left for g in geometry] if geometry is not None else None
    ids = time_ids(sizes, crops, target_size, len(prompts), parameter.device, parameter.dtype)
    return {
        "encoder_hidden_states": hidden.to(parameter.device, parameter.dtype),
        "text_embeds": pooled.to(parameter.device, parameter.dtype),
        "time_ids": ids,
    }


def sdxl_pipeline(loaded, scheduler):
    """diffusers' ``StableDiffusionXLPipeline`` around the model's own modules (no watermarker), sampling
    with ``scheduler`` as given; ``force_zeros_for_empty_prompt`` as the model was loaded with."""
    from diffusers import StableDiffusionXLPipeline

    components = loaded.components
    missing = [name for name in ("tokenizer", "tokenizer_2") if components.get(name) is None]
    if missing:
        raise BadInput(
            f"{loaded.source} has no {missing[0]}: StableDiffusionXLPipeline needs both tokenizers"
        )
    pipeline = StableDiffusionXLPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer=components["tokenizer"],
        tokenizer_2=components["tokenizer_2"],
        unet=loaded.model,
        scheduler=scheduler.__class__.from_config(scheduler.config),
        force_zeros_for_empty_prompt=bool(loaded.extras.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
    pipeline.scheduler = scheduler  # sampled with as given, unchanged, as dp eval does
    return pipeline
