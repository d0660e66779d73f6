"""Saving a latent model: the dpcli format for the UNet plus the untouched components."""

from __future__ import annotations

from pathlib import Path

from dpcli.adapters.base import LoadedModel
from dpcli.adapters.latent.detect import CLASS_EMBEDDER_FILE


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
        elif name.startswith("tokenizer"):
            component.save_pretrained(str(path))
            library = "transformers"
        else:
            component.save_pretrained(str(path), safe_serialization=True)
            library = type(component).__module__.split(".")[0]
        described[name] = {"class": type(component).__name__, "library": library, "path": name}
    latent = {k: v for k, v in loaded.extras.items() if isinstance(v, (int, float, str, type(None)))}
    return save_model(loaded, folder, {**metadata, "components": described, "latent": latent})
