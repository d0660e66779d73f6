"""The data layer: every command that reads images (``score`` calibration, ``finetune``, ``eval``'s FID
reference) names a source and a transform here, and reads it in batches through a DataLoader.

- ``open_source(spec)``: an image folder (``folder``), a Hugging Face dataset (``hf``), tar shards
  (``shards``) or ``builtin:digits`` (``builtin``), as a ``Source`` with random access to ``Example``\\ s.
- ``ImageTransform``: resize, center/random crop, flip, scale to [-1, 1] (``transforms``).
- ``training_batches`` / ``example_batches``: lazily decoded batches in worker processes (``loader``).
- ``BadSampleLog``, ``recording``: bad examples skipped, counted and reported (``bad_samples``).
- ``LatentCache``: autoencoder latents of LDM training images, encoded once (``latent_cache``).
"""

from __future__ import annotations

import glob
from pathlib import Path

from dpcli.data.bad_samples import BadExample, BadSampleLog, TooManyBadSamples, recording
from dpcli.data.base import DataSpec, Example, Source
from dpcli.data.builtin import BUILTIN_DATASETS, DigitsSource, builtin_digits
from dpcli.data.folder import IMAGE_SUFFIXES, ImageFolderSource, list_images
from dpcli.data.loader import Batch, DataOrder, default_workers, example_batches, training_batches
from dpcli.data.transforms import CROPS, ImageTransform
from dpcli.errors import BadInput

__all__ = [
    "BUILTIN_DATASETS",
    "BadExample",
    "BadSampleLog",
    "TooManyBadSamples",
    "recording",
    "CROPS",
    "IMAGE_SUFFIXES",
    "Batch",
    "DataOrder",
    "DataSpec",
    "Example",
    "ImageTransform",
    "Source",
    "builtin_digits",
    "default_workers",
    "example_batches",
    "list_images",
    "load_images",
    "open_source",
    "training_batches",
]

DATASET_FILE_SUFFIXES = (".parquet", ".arrow")


def open_source(spec: DataSpec | str) -> Source:
    """The source ``spec`` names (see ``DataSpec``), opened: listed or indexed, nothing decoded yet.

    Bad sources (missing path, no images, unknown split or column, empty or corrupt shard) are a BadInput
    naming the problem. The source keeps the spec's ``on_bad_sample`` and ``max_bad_fraction``: the batches
    read from it skip (or fail on) bad examples accordingly (``bad_samples``).
    """
    spec = DataSpec(spec) if isinstance(spec, str) else spec
    source = _open(spec)
    source.on_bad_sample, source.max_bad_fraction = spec.on_bad_sample, spec.max_bad_fraction
    return source


def _open(spec: DataSpec) -> Source:
    text = spec.source
    hf_options = (spec.split, spec.image_column, spec.caption_column, spec.label_column)
    kind = source_kind(text)
    if kind != "hf" and any(option is not None for option in hf_options):
        raise BadInput(
            f"--split and the --*-column options apply to Hugging Face datasets; {text} is a {kind} source"
        )
    if kind == "builtin":
        return DigitsSource(text)
    if kind == "shards":
        from dpcli.data.shards import TarShardSource

        return TarShardSource(text)
    if kind == "hf":
        from dpcli.data.hf import HuggingFaceSource

        return HuggingFaceSource(spec)
    return ImageFolderSource(text)


def source_kind(text: str) -> str:
    """``builtin``, ``hf``, ``shards`` or ``folder``: what kind of source ``text`` names (no reading)."""
    if text.startswith("builtin:"):
        return "builtin"
    if text.startswith("hf:"):
        return "hf"
    path = Path(text).expanduser()
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return "shards"
    if path.suffix in DATASET_FILE_SUFFIXES or (
        glob.has_magic(text) and text.endswith(DATASET_FILE_SUFFIXES)
    ):
        return "hf"
    if path.is_dir():  # decided from the top level alone: a folder of a million images is listed once, later
        if any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
            return "hf"
        suffixes = {entry.suffix.lower() for entry in path.iterdir() if entry.is_file()}
        if not suffixes & set(IMAGE_SUFFIXES):
            if ".tar" in suffixes:
                return "shards"
            if suffixes & set(DATASET_FILE_SUFFIXES):
                return "hf"
    return "folder"


def load_images(spec: DataSpec | str, size: int, channels: int, limit: int | None = None):
    """The first ``limit`` (default all) images of a source as one tensor [N, channels, size, size] in
    [-1, 1], center-cropped. Convenient for small data; commands stream with ``example_batches`` instead."""
    import torch

    source = open_source(spec)
    count = len(source) if limit is None else min(limit, len(source))
    transform = ImageTransform(size, channels)
    return torch.cat([batch.pixels for batch in example_batches(source, transform, range(count), workers=0)])
