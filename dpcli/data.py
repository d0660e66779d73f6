"""Calibration and training images: image folders and the built-in digits, as tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpcli.errors import BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN_DATASETS = ("digits",)
_RESOURCES = Path(__file__).resolve().parent / "resources"


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), in a stable sorted order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_files(spec: str) -> tuple[list[Path], Path] | None:
    """The image files ``load_images(spec)`` reads, in its order, and the data root; None for built-ins."""
    if spec.startswith("builtin:"):
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return list_images(path), path
    return [path], path.parent


def builtin_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI ML hand-written digits (1797 images, 8x8, values 0..16) and their labels (0..9).

    From the copy scikit-learn ships (E. Alpaydin, C. Kaynak, UCI Machine Learning Repository, CC BY 4.0);
    stored in the package as resources/digits.npz.
    """
    with np.load(_RESOURCES / "digits.npz", allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


def _to_tensor(image, size: int, channels: int) -> torch.Tensor:
    """Resize (shorter side) and centre-crop a PIL image to size x size; scale to [-1, 1], CHW."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    cropped = resized.crop((left, top, left + size, top + size))
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    if channels == 1:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
        if channels != 3:
            raise BadInput(f"cannot convert images to {channels} channels (supported: 1 or 3)")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_images(spec: str, size: int, channels: int, limit: int | None = None) -> torch.Tensor:
    """Images from a folder or ``builtin:NAME`` as one float tensor [N, channels, size, size] in [-1, 1].

    ``limit`` keeps the first N images (folders sort by path). Unreadable files are an error naming them.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "digits":
            raise BadInput(f"unknown built-in dataset '{name}' (available: {', '.join(BUILTIN_DATASETS)})")
        return _builtin_digits_tensor(size, channels, limit)
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise BadInput(f"data not found: {spec}")
    files = list_images(folder) if folder.is_dir() else [folder]
    if not files:
        raise BadInput(f"no images in {spec} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    if limit is not None:
        files = files[:limit]
    from PIL import Image, UnidentifiedImageError

    tensors = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                tensors.append(_to_tensor(image, size, channels))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise BadInput(f"unreadable image {file}: {str(exc).splitlines()[0]}") from None
    return torch.stack(tensors)


def _builtin_digits_tensor(size: int, channels: int, limit: int | None) -> torch.Tensor:
    images, _ = builtin_digits()
    if limit is not None:
        images = images[:limit]
    pixels = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    if size != 8:
        pixels = torch.nn.functional.interpolate(
            pixels, size=(size, size), mode="bilinear", align_corners=False
        )
    pixels = pixels.clamp(0, 1) * 2 - 1
    if channels == 3:
        pixels = pixels.expand(-1, 3, -1, -1).contiguous()
    elif channels != 1:
        raise BadInput(f"cannot serve builtin:digits with {channels} channels (supported: 1 or 3)")
    return pixels
