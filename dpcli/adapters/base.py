"""The adapter contract. Kept free of heavy imports: adapters are discovered on every command.

An adapter is a ``ModelAdapter`` subclass. Registering it through ``LazyAdapter(name, description,
detect, target="pkg.module:Class")`` keeps the plugin's entry-point module cheap: the class, and with it
torch/diffusers, is imported only when a model is used. ``DiffusersAdapter`` holds the pruning defaults
of diffusers denoisers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpcli.errors import BadInput, BadSetting, DpError
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
    adapter_name: str
    source: str
    source_kind: str
    config: dict
    sample_size: int
    in_channels: int
    scheduler: Any = None
    scheduler_origin: str = ""
    components: dict[str, Any] = field(default_factory=dict)
    record: dict | None = None
    notes: list[str] = field(default_factory=list)
    # Adapter-specific facts the hooks need (the ldm adapter: latent scaling factor, conditioning kind).
    extras: dict[str, Any] = field(default_factory=dict)
    # The adapter object named by ``adapter_name``; dpcli.loading.load_model sets it (never None after).
    adapter: ModelAdapter = field(default=None, repr=False)


@dataclass
class BatchContext:
    """What ``ModelAdapter.prepare_batch`` may use besides the images, all None when unknown: the rows'
    ``captions`` and class ``labels`` (from the data source), a text ``prompt`` that replaces every caption
    (``--prompt``), and ``latents`` already encoded (the latent cache; then ``images`` may be None).
    ``files``/``root``: the rows' image files and data folder, for image-folder sources."""

    files: list[Path] | None = None
    root: Path | None = None
    prompt: str | None = None
    captions: list[str] | None = None
    labels: torch.Tensor | None = None
    latents: torch.Tensor | None = None


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

    def sampling_conditioning(
        self, loaded: LoadedModel, batch_size: int, generators: list[torch.Generator] | None = None, **options
    ):
        """Conditioning for ``batch_size`` samples (None for unconditional models). ``generators``: one CPU
        ``torch.Generator`` per sample, for whatever is drawn at random (``random_class_labels``).
        ``options``: ``prompt``/``negative_prompt`` (text models), ``class_labels`` (class models, one
        per sample), as ``conditioning_spec`` allows."""
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
        Raise BadInput for a ``context.prompt`` the model cannot take."""
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
        """Fix attributes the pruned modules left stale."""

    def save(self, loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
        """Write ``loaded`` into ``folder`` in the dpcli format; return the metadata written."""
        raise NotImplementedError


class DiffusersAdapter(ModelAdapter):
    """Defaults for diffusers denoisers: the output layer (``output_layer``, a module path, ``conv_out``
    for UNets) is never pruned, attention heads and GEGLU halves are kept whole
    (``dpcli.adapters.diffusers_fixes.pruning_options``), the attributes of pruned diffusers modules are
    fixed afterwards, and the model is saved in the dpcli format (``dpcli.io.model_format.save_model``)."""

    output_layer: str = "conv_out"

    def ignored_layers(self, loaded: LoadedModel) -> list:
        return [loaded.model.get_submodule(self.output_layer)]

    def pruner_options(self, loaded: LoadedModel) -> dict:
        from dpcli.adapters.diffusers_fixes import pruning_options

        return pruning_options(loaded.model)

    def fix_pruned_modules(self, loaded: LoadedModel, pruner) -> None:
        from dpcli.adapters.diffusers_fixes import fix_attributes, heads_after_pruning

        fix_attributes(loaded.model, heads_after_pruning(loaded.model, pruner))

    def save(self, loaded: LoadedModel, folder: Path, metadata: dict) -> dict:
        from dpcli.io.model_format import save_model

        return save_model(loaded, folder, metadata)


def _import(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


class LazyAdapter(ModelAdapter):
    """An adapter registered by name whose implementation is imported on first use.

    ``detect``: a function ``(ModelSource) -> float``, or its path ``"pkg.module:function"`` (imported when
    dp first asks). ``target``: ``"pkg.module:Class"``, a ``ModelAdapter`` subclass, imported and
    instantiated on the first call of any other method; it gets this adapter's ``name`` and
    ``description``. Every method of the contract, and any other attribute, is served by that instance.
    """

    def __init__(self, name: str, description: str, detect: Callable | str, target: str) -> None:
        self.name = name
        self.description = description
        self._detect = detect
        self._target = target
        self._implementation: ModelAdapter | None = None

    def detect(self, source: ModelSource) -> float:
        detect = _import(self._detect) if isinstance(self._detect, str) else self._detect
        return detect(source)

    @property
    def implementation(self) -> ModelAdapter:
        """The ``target`` adapter instance (imported on first use)."""
        if self._implementation is None:
            try:
                cls = _import(self._target)
            except (ImportError, AttributeError, ValueError) as exc:
                raise DpError(
                    f"adapter {self.name!r} cannot import its implementation {self._target}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
                raise DpError(f"adapter {self.name!r}: {self._target} is not a ModelAdapter subclass")
            implementation = cls()
            implementation.name, implementation.description = self.name, self.description
            self._implementation = implementation
        return self._implementation

    def __getattr__(self, attribute: str) -> Any:
        # Only reached for names LazyAdapter does not have: an implementation's own helpers.
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self.implementation, attribute)

    def __repr__(self) -> str:
        return f"LazyAdapter({self.name!r}, target={self._target!r})"


def _forwarded(method: str) -> Callable:
    def forward(self: LazyAdapter, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.implementation, method)(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = method
    forward.__doc__ = getattr(ModelAdapter, method).__doc__
    return forward


CONTRACT_METHODS = tuple(
    name for name, value in vars(ModelAdapter).items() if callable(value) and not name.startswith("_")
)
for _method in CONTRACT_METHODS:
    if _method != "detect":
        setattr(LazyAdapter, _method, _forwarded(_method))


def random_class_labels(generators: list[torch.Generator], num_classes: int) -> torch.Tensor:
    """One label in ``0..num_classes-1`` per sample, each drawn from that sample's generator."""
    import torch

    return torch.cat([torch.randint(0, num_classes, (1,), generator=g) for g in generators])


def no_prompt(adapter: str) -> BadInput:
    return BadSetting(
        "prompt",
        "{prompt} is not supported by the {adapter} adapter (its models take no text)",
        adapter=adapter,
    )
