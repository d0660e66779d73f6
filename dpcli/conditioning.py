"""Conditioning that comes with calibration images: class labels from sub-folders, captions beside them.

Class labels: ``DATA/<class>/image.png``. Sub-folders named by numbers are those class indices; otherwise
the class index is the position of the name among the sorted sub-folders of ``DATA`` (torchvision's
ImageFolder convention, which gives ImageNet's indices for its wnid folders).

Captions, per image, first found wins: a sidecar ``image.txt``; an entry in ``metadata.jsonl``
(``{"file_name": "image.png", "text": "..."}``, the Hugging Face ImageFolder format; ``caption`` or
``prompt`` also accepted) or ``captions.txt`` (``image.png<TAB>caption`` per line) in the image's folder
or any folder above it up to ``DATA``, with ``file_name`` relative to the folder holding the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpcli.errors import BadInput, BadSetting

CAPTION_KEYS = ("text", "caption", "prompt")


def captions(files: list[Path] | None, root: Path | None, count: int) -> list[str]:
    """One caption per image; the empty prompt for all when there are no captions at all.

    Images without a caption while others have one are an error naming the first such image.
    """
    if files is None:
        return [""] * count
    root = Path(root) if root is not None else None
    tables: dict[Path, dict[str, str]] = {}
    found = [_caption(Path(file), root, tables) for file in files]
    if all(caption is None for caption in found):
        return [""] * count
    missing = [file for file, caption in zip(files, found, strict=True) if caption is None]
    if missing:
        raise BadSetting(
            "prompt",
            "no caption for {file} although other images have one (sidecar .txt, metadata.jsonl or "
            "captions.txt); caption every image or pass {prompt}",
            file=missing[0],
        )
    return found


def _caption(file: Path, root: Path | None, tables: dict[Path, dict[str, str]]) -> str | None:
    sidecar = file.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8").strip()
    folder = file.parent
    while True:
        if folder not in tables:
            tables[folder] = _caption_table(folder)
        key = file.relative_to(folder).as_posix()
        if key in tables[folder]:
            return tables[folder][key]
        if root is None or folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def _caption_table(folder: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise BadInput(f"{metadata}:{number}: not valid JSON") from None
            name = entry.get("file_name") if isinstance(entry, dict) else None
            text = next((entry[key] for key in CAPTION_KEYS if key in entry), None) if name else None
            if not isinstance(name, str) or not isinstance(text, str):
                raise BadInput(f'{metadata}:{number}: expected {{"file_name": ..., "text": ...}}')
            table[Path(name).as_posix()] = text.strip()
    listing = folder / "captions.txt"
    if listing.is_file():
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            name, tab, text = line.partition("\t")
            if not tab:
                raise BadInput(f"{listing}:{number}: expected FILE<TAB>CAPTION")
            table[Path(name.strip()).as_posix()] = text.strip()
    return table


def class_labels(files: list[Path] | None, root: Path | None, num_classes: int) -> torch.Tensor:
    """The class index of each image from the sub-folder of ``root`` it is in."""
    if files is None or root is None:
        raise BadSetting(
            "data",
            "class-conditional models need class labels: give {data} a folder with one sub-folder per class",
        )
    root = Path(root)
    folders = [Path(file).relative_to(root).parts for file in files]
    outside = [file for file, parts in zip(files, folders, strict=True) if len(parts) < 2]
    if outside:
        raise BadInput(
            f"{outside[0]} is not in a class sub-folder of {root}: class-conditional models need one "
            "sub-folder per class (named by class index, or sorted names as in torchvision's ImageFolder)"
        )
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    numeric = all(name.isdigit() for name in classes)
    labels = [int(parts[0]) if numeric else classes.index(parts[0]) for parts in folders]
    wrong = [label for label in labels if label >= num_classes]
    if wrong:
        raise BadInput(
            f"class index {wrong[0]} (from the sub-folders of {root}) is out of range: the model has "
            f"{num_classes} classes"
        )
    return torch.tensor(labels, dtype=torch.long)
