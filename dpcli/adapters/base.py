"""The adapter contract. Kept free of heavy imports: adapters are discovered on every command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpcli._deprecated import renamed_methods
from dpcli.errors import BadInput, BadSetting
from dpcli.io.files import read_json

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSource:
    """What the user pointed at, resolved: a folder, a single file, a Hub snapshot or a built-in name.

    ``spec`` is the text the user typed. For Hub ids ``path`` is the local snapshot folder.
    """

    spec: str
    kind: str  # folder | file | hub | builtin
    path: Path | None = None
    _state_dict: dict | None = field(default=None, repr=False)

    def read_json(self, relative: str) -> dict | None:
        """A JSON file inside a folder source, or None when it is absent."""
        if self.path is None or not self.path.is_dir():
            return None
        file = self.path / relative
        return read_json(file) if file.is_file() else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of a single-file source, loaded safely once (see dpcli.io.weights.load_tensor_file)."""
        if self._state_dict is None:
            from dpcli.io.weights import load_tensor_file

            self._state_dict = load_tensor_file(self.path)
        return self._state_dict

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower() if self.path is not None and self.kind == "file" else ""


@dataclass
class LoadedModel:
    """A model ready for dp: the denoiser that gets pruned, its scheduler and what else it needs."""

    model: torch.nn.Module
    adapter: str
    source: str
    source_kind: str
    config: dict
    sample_size: int
    in_channels: int
    scheduler: Any = None
    scheduler_origin: str = ""
    components: dict[str, Any] = field(default_factory=dict)
    pruning: dict | None = None
    notes: list[str] = field(default_factory=list)
    # Adapter-specific facts the hooks need (the ldm adapter: latent scaling factor, conditioning kind).
    extras: dict[str, Any] = field(default_factory=dict)
    # The adapter object named by ``adapter``; dpcli.loading.load_model sets it.
    adapter_object: ModelAdapter | None = field(default=None, repr=False)


@dataclass
class BatchContext:
    """What ``ModelAdapter.prepare_batch`` may use besides the images, all None when unknown: the rows'
    ``captions`` and class ``labels`` (from the data source), a text ``prompt`` that replaces every caption
    (``--prompt``), and ``latents`` already encoded (the latent cache; then ``images`` may be None).
    ``files``/``root``: the rows' image files and data folder, for image-folder sources. ``geometry``: each
    row's ``dpcli.data.transforms.Geometry`` (size before resizing, crop corner; SDXL's time ids).
    ``text_cache``: a folder where text embeddings may be kept per caption (``--cache-latents``)."""

    files: list[Path] | None = None
    root: Path | None = None
    prompt: str | None = None
    captions: list[str] | None = None
    labels: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    geometry: list | None = None
    text_cache: Path | None = None


@dataclass(frozen=True)
class ConditioningSpec:
    """What a model is conditioned on when it samples (``ModelAdapter.conditioning_spec``).

    ``kind``: ``none``, ``text`` (prompts) or ``class`` (class labels ``0..num_classes-1``).
    ``default_guidance_scale``: the classifier-free guidance scale its diffusers pipeline samples with
    (7.5 for StableDiffusionPipeline; 1, no guidance, otherwise). ``guidance``: whether it has an
    unconditional input (the empty prompt, a null class), without which guidance is impossible."""

    kind: str = "none"
    num_classes: int | None = None
    default_guidance_scale: float = 1.0
    guidance: bool = False


class ModelAdapter:
    """Base class for adapters. Subclasses set ``name``/``description`` and override what they support."""

    name: str = ""
    description: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        renamed_methods(cls, ModelAdapter, {"after_pruning": "fix_pruned_modules"})
        if "prepare_calibration" in vars(cls) and "prepare_batch" not in vars(cls):
            renamed_methods(cls, ModelAdapter, {"prepare_calibration": "prepare_batch"})  # warns
            cls.prepare_batch = _prepare_batch_with_old_signature

    def detect(self, source: ModelSource) -> float:
        """How sure this adapter is that it can load ``source``: 0 (not mine) to 1 (certainly mine)."""
        return 0.0

    def load(self, source: ModelSource, config: Path | None = None) -> LoadedModel:
        """Load ``source``; ``config`` overrides an inferred model config. Raise BadInput on bad input."""
        raise NotImplementedError

    def example_inputs(self, loaded: LoadedModel, batch_size: int = 1) -> tuple:
        """Positional inputs for one forward of ``loaded.model`` at the native sample size."""
        raise NotImplementedError

    def predict(self, loaded: LoadedModel, sample, timesteps, conditioning=None):
        """The model's prediction (noise, or v) for noisy ``sample`` at ``timesteps``."""
        raise NotImplementedError

    # Sampling (used by dp eval / dp compare and fine-tuning previews) ------------------------------
    def noise_shape(self, loaded: LoadedModel) -> tuple[int, ...]:
        """Shape of one sample the denoiser works on (C, H, W): pixels, or latents for latent models."""
        return (loaded.in_channels, loaded.sample_size, loaded.sample_size)

    def conditioning_spec(self, loaded: LoadedModel) -> ConditioningSpec:
        """What ``loaded`` is conditioned on when sampling (default: nothing). dp eval / dp compare check
        --prompt, --class-label and --guidance-scale against it, and pass ``prompt``, ``negative_prompt``
        and ``class_labels`` (one per sample) to ``sampling_conditioning`` accordingly."""
        return ConditioningSpec()

    def sampling_conditioning(self, loaded: LoadedModel, batch_size: int, generator=None, **options):
        """Conditioning for ``batch_size`` samples (None for unconditional models). Latent adapters return
        e.g. class labels or prompt embeddings here; ``options`` carries command options such as a prompt."""
        return None

    def denoise(self, loaded: LoadedModel, sample, timesteps, conditioning=None, guidance_scale: float = 1.0):
        """The prediction the sampler steps with; conditional adapters apply classifier-free guidance here."""
        return self.predict(loaded, sample, timesteps, conditioning)

    def decode(self, loaded: LoadedModel, sample):
        """Turn a final denoised sample into images in [-1, 1] (latent models decode with their autoencoder)."""
        return sample

    # Calibration data -------------------------------------------------------------------------
    def data_size(self, loaded: LoadedModel) -> int:
        """Side length images are resized to before ``prepare_batch``."""
        return loaded.sample_size

    def data_channels(self, loaded: LoadedModel) -> int:
        return loaded.in_channels

    def prepare_batch(self, loaded: LoadedModel, images, context: BatchContext):
        """Turn images in [-1, 1] into ``(x0, conditioning)`` for the denoiser (latent models encode here,
        unless ``context.latents`` holds them already; conditional models read ``context.captions`` /
        ``context.labels``).

        Formerly ``prepare_calibration``. Raise BadInput for a ``context.prompt`` the model cannot take."""
        if context.prompt is not None:
            raise no_prompt(self.name)
        parameter = next(loaded.model.parameters())
        return images.to(parameter.device, parameter.dtype), None

    def check_data(self, loaded: LoadedModel, source, prompt: str | None = None) -> None:
        """Refuse, before any work, a data source (``dpcli.data.Source``) that cannot condition the model
        (``conditioning_spec``): a class model needs a label in range for every example, a text model
        without ``prompt`` captions for all examples or none."""
        spec = self.conditioning_spec(loaded)
        if spec.kind == "class":
            source.check_labels(int(spec.num_classes))
        elif spec.kind == "text" and prompt is None:
            source.check_captions()

    def encode_images(self, loaded: LoadedModel, images):
        """Images in [-1, 1] as the samples the denoiser works on. Pixel models: None (nothing to encode,
        so nothing for ``--cache-latents`` to keep); latent models: the scaled autoencoder latents."""
        return None

    def autoencoder(self, loaded: LoadedModel):
        """The module ``encode_images`` runs (its weights key the latent cache), or None."""
        return None

    # Pruning --------------------------------------------------------------------------------------
    def ignored_layers(self, loaded: LoadedModel) -> list:
        """Modules torch-pruning must leave alone (at least the output convolution)."""
        return []

    def pruner_options(self, loaded: LoadedModel) -> dict:
        """Extra torch-pruning arguments: ``num_heads`` and ``out_channel_groups`` dicts."""
        return {}

    def fix_pruned_modules(self, loaded: LoadedModel, pruner) -> None:
        """Fix attributes the pruned modules left stale. Formerly ``after_pruning``."""

    def save(self, loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
        """Write ``loaded`` into ``folder`` in the dpcli format; return the metadata written."""
        raise NotImplementedError


def no_prompt(adapter: str) -> BadInput:
    return BadSetting(
        "prompt",
        "{prompt} is not supported by the {adapter} adapter (its models take no text)",
        adapter=adapter,
    )


def _prepare_batch_with_old_signature(self, loaded: LoadedModel, images, context: BatchContext):
    """``prepare_batch`` of a plugin that defines only the deprecated ``prepare_calibration(loaded, images,
    [files, root, prompt])``: passes the context's fields that method accepts."""
    import inspect

    accepted = inspect.signature(self.prepare_calibration).parameters
    if context.prompt is not None and "prompt" not in accepted:
        raise no_prompt(self.name)
    extra = {name: value for name, value in vars(context).items() if name in accepted and value is not None}
    return self.prepare_calibration(loaded, images, **extra)
