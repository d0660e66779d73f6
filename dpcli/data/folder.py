"""Image folders: every image below a folder (recursive, sorted by path), with captions and class labels.

Class labels: ``DATA/<class>/image.png``. Sub-folders named by numbers are those class indices; otherwise
the class index is the position of the name among the sorted sub-folders of ``DATA`` (torchvision's
ImageFolder convention, which gives ImageNet's indices for its wnid folders).

Captions, per image, first found wins: a sidecar ``image.txt``; an entry in ``metadata.jsonl``
(``{"file_name": "image.png", "text": "..."}``, the Hugging Face ImageFolder format; ``caption`` or
``prompt`` also accepted) or ``captions.txt`` (``image.png<TAB>caption`` per line) in the image's folder
or any folder above it up to ``DATA``, with ``file_name`` relative to the folder holding the file.

Opening a folder lists it once and reads the caption tables; images and sidecar captions are read when an
example is asked for. Memory is one relative path (and table caption) per image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpcli.data.bad_samples import BadExample
from dpcli.data.base import Example, Source, label_out_of_range
from dpcli.errors import BadInput, BadSetting

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption", "prompt")
_SIDECAR = object()  # marks "the caption is in image.txt", read with the image


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursive), in a stable sorted order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(file, what: str):
    """Decode an image file (a path or a binary file object) with PIL, in a mode the transforms take
    (``usable_mode``); a ``BadExample`` naming ``what`` if it is unreadable or unusable."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's notes on odd palettes and EXIF: usable_mode converts
            with Image.open(file) as image:
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)  # animated: the first frame
                image.load()
                return usable_mode(image, what)
    except BadExample:
        raise
    except UnidentifiedImageError:
        raise BadExample(what, "not an image PIL can identify") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadExample(what, _first_line(exc)) from None
    except Image.DecompressionBombError as exc:
        raise BadExample(what, _first_line(exc)) from None


def usable_mode(image, what: str):
    """``image`` in a mode that converts faithfully to RGB or gray: 16-bit and 32-bit gray scaled to 8
    bits, palettes with transparency and bilevel images expanded, CMYK/YCbCr/LAB/HSV to RGB. A mode PIL
    cannot convert is a ``BadExample``."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if image.width < 1 or image.height < 1:
        raise BadExample(what, f"empty image ({image.width}x{image.height})")
    if mode in ("RGB", "L", "RGBA", "LA"):
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise BadExample(what, f"{mode} image with NaN or infinite pixels")
        if mode == "F" and array.max(initial=0) <= 1.0:
            array = array * 255.0
        elif mode != "F" and array.max(initial=0) > 255:  # 16-bit range
            array = array / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    try:
        if mode in ("P", "PA"):
            return image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
        if mode == "1":
            return image.convert("L")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadExample(what, f"cannot convert a {mode} image: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ImageFolderSource(Source):
    """The images below ``root`` (or one image file), their captions and class sub-folders."""

    kind = "folder"

    def __init__(self, spec: str):
        self.spec = spec
        path = Path(spec).expanduser()
        if not path.exists():
            raise BadInput(f"data not found: {spec}")
        if path.is_dir():
            self.root = path
            files, sidecars = _walk(path)
        else:
            self.root = path.parent
            files = [path.name] if path.suffix.lower() in IMAGE_SUFFIXES else []
            sidecars = {path.with_suffix(".txt").name} if path.with_suffix(".txt").is_file() else set()
        if not files:
            raise BadInput(f"no images in {spec} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
        self.files = files  # relative POSIX paths, sorted
        self._captions = _find_captions(self.root, files, sidecars)
        self._classes = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        numeric = all(name.isdigit() for name in self._classes)
        self._class_index = {name: int(name) if numeric else i for i, name in enumerate(self._classes)}

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def identity(self, index: int) -> tuple[str, str]:
        stat = self.path(index).stat()
        return self.files[index], f"{stat.st_size}-{stat.st_mtime_ns}"

    def example(self, index: int) -> Example:
        path = self.path(index)
        image = read_image(path, str(path))
        identity, version = self.identity(index)
        return Example(image, self.caption(index), self.label(index), identity, version)

    def caption(self, index: int) -> str | None:
        caption = self._captions[index]
        if caption is _SIDECAR:
            return self.path(index).with_suffix(".txt").read_text(encoding="utf-8").strip()
        return caption

    @property
    def has_captions(self) -> bool:
        return any(caption is not None for caption in self._captions)

    def check_captions(self) -> None:
        """Either every image has a caption or none has; a BadSetting naming the first uncaptioned image."""
        if not self.has_captions:
            return
        missing = next((i for i, caption in enumerate(self._captions) if caption is None), None)
        if missing is not None:
            raise BadSetting(
                "prompt",
                "no caption for {file} although other images have one (sidecar .txt, metadata.jsonl or "
                "captions.txt); caption every image or pass {prompt}",
                file=self.path(missing),
            )

    @property
    def has_labels(self) -> bool:
        return bool(self._classes) and all("/" in name for name in self.files)

    def label(self, index: int) -> int | None:
        folder, slash, _ = self.files[index].partition("/")
        if not slash:
            return None
        return self._class_index[folder]

    def check_labels(self, num_classes: int) -> None:
        outside = next((name for name in self.files if "/" not in name), None)
        if outside is not None or not self._classes:
            raise BadSetting(
                "data",
                "{where} is not in a class sub-folder of {root}: class-conditional models need {data} to be "
                "a folder with one sub-folder per class (named by class index, or sorted names as in "
                "torchvision's ImageFolder)",
                where=self.root / outside if outside else self.root,
                root=self.root,
            )
        for name in sorted({name.partition("/")[0] for name in self.files}):
            label = self._class_index[name]
            if not 0 <= label < num_classes:
                raise label_out_of_range(label, num_classes, f"sub-folder {self.root / name}")

    def fingerprint(self) -> str:
        """The sorted image paths with their sizes: cheap for 100k images, and it catches added, removed,
        renamed or re-encoded files, but not a copy (mtimes are left out on purpose)."""
        import hashlib

        digest = hashlib.sha256()
        for name in self.files:
            digest.update(f"{name}\t{(self.root / name).stat().st_size}\n".encode())
        return digest.hexdigest()


def _walk(root: Path) -> tuple[list[str], set[str]]:
    """Image files (relative, sorted) and the .txt files below ``root``, in one walk."""
    images, texts = [], set()
    for folder, _, names in os.walk(root, followlinks=True):
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        for name in names:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES:
                images.append(prefix + name)
            elif suffix == ".txt":
                texts.add(prefix + name)
    return sorted(images), texts


def _find_captions(root: Path, files: list[str], sidecars: set[str]) -> list:
    """Per image: _SIDECAR, the caption from a table, or None."""
    tables: dict[str, dict[str, str]] = {}
    found = []
    for name in files:
        stem = os.path.splitext(name)[0]
        if stem + ".txt" in sidecars:
            found.append(_SIDECAR)
            continue
        caption = None
        folder = name.rpartition("/")[0]
        while True:
            if folder not in tables:
                tables[folder] = _caption_table(root / folder)
            key = name[len(folder) + 1 :] if folder else name
            if key in tables[folder]:
                caption = tables[folder][key]
                break
            if not folder:
                break
            folder = folder.rpartition("/")[0]
        found.append(caption)
    return found


def caption_entries(file: Path, names: bool = True) -> list[tuple[str | None, str]]:
    """``(file name, caption)`` pairs of a ``metadata.jsonl`` (one JSON object a line with ``text``,
    ``caption`` or ``prompt``, and ``file_name`` unless ``names`` is False: then the name is None) or of a
    ``captions.txt`` (``FILE<TAB>CAPTION`` a line). A malformed line is a BadInput naming it."""
    entries: list[tuple[str | None, str]] = []
    for number, line in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix.lower() == ".jsonl":
            try:
                entry = json.loads(line)
            except ValueError:
                raise BadInput(f"{file}:{number}: not valid JSON") from None
            name = entry.get("file_name") if isinstance(entry, dict) else None
            text = (
                next((entry[key] for key in CAPTION_KEYS if key in entry), None)
                if isinstance(entry, dict)
                else None
            )
            if not isinstance(text, str) or (names and not isinstance(name, str)):
                expected = (
                    '{"file_name": ..., "text": ...}'
                    if names
                    else 'an object with "text" (or "caption", "prompt")'
                )
                raise BadInput(f"{file}:{number}: expected {expected}")
            entries.append((Path(name).as_posix() if names else None, text.strip()))
        else:
            name, tab, text = line.partition("\t")
            if not tab:
                raise BadInput(f"{file}:{number}: expected FILE<TAB>CAPTION")
            entries.append((Path(name.strip()).as_posix(), text.strip()))
    return entries


def _caption_table(folder: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    for listing in (folder / "metadata.jsonl", folder / "captions.txt"):
        if listing.is_file():
            table.update(caption_entries(listing))
    return table
