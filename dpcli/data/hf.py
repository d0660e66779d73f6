"""Hugging Face datasets (the ``datasets`` library): what diffusers' training scripts read.

``--data`` may name a ``save_to_disk`` folder, ``.parquet``/``.arrow`` files (a glob too), a folder of
them, or ``hf:NAME`` (``hf:NAME/CONFIG``), a Hub dataset read from the local Hugging Face cache
(``HF_HOME``/``HF_DATASETS_CACHE``; ``HF_DATASETS_OFFLINE=1`` is respected, nothing is downloaded then).
Rows are read by index from the memory-mapped Arrow table, so memory does not grow with the data set.
Columns are guessed (an ``Image`` feature, a ``ClassLabel`` feature, a text column named ``text``,
``caption``, ...) or named with ``--image-column``, ``--caption-column``, ``--label-column``.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path

from dpcli.data.bad_samples import BadExample
from dpcli.data.base import DataSpec, Example, Source, label_out_of_range
from dpcli.errors import BadInput

IMAGE_NAMES = ("image", "img", "png", "jpg", "jpeg", "webp", "pixel_values")
CAPTION_NAMES = ("text", "caption", "captions", "prompt", "sentence", "txt")
LABEL_NAMES = ("label", "labels", "class", "cls", "fine_label", "class_label")


class HuggingFaceSource(Source):
    """One split of a Hugging Face dataset, read row by row."""

    kind = "hf"

    def __init__(self, spec: DataSpec):
        self.spec = spec.source
        self.split, dataset = _load(spec)
        self.fingerprint_of_dataset = getattr(dataset, "_fingerprint", "") or ""
        columns = list(dataset.column_names)
        features = dataset.features
        self.image_column = _column(spec.image_column, "image", columns, self.spec) or _guess_image(features)
        if self.image_column is None:
            raise BadInput(
                f"{self.spec}: no image column found among {', '.join(columns)}; name it with --image-column"
            )
        self.caption_column = _column(spec.caption_column, "caption", columns, self.spec) or _guess(
            columns, CAPTION_NAMES, lambda name: _is_text(features[name])
        )
        self.label_column = _column(spec.label_column, "label", columns, self.spec) or _guess_label(features)
        self._images = dataset.select_columns([self.image_column])
        if _is_image_feature(features[self.image_column]):  # decoded here, not by datasets: one decoder
            import datasets

            self._images = self._images.cast_column(self.image_column, datasets.Image(decode=False))
        extra = [c for c in (self.caption_column, self.label_column) if c is not None]
        self._metadata = dataset.select_columns(extra) if extra else None
        if len(dataset) == 0:
            raise BadInput(f"{self.spec}: split {self.split!r} has no rows")
        self._length = len(dataset)

    def __len__(self) -> int:
        return self._length

    def identity(self, index: int) -> tuple[str, str]:
        return f"{self.spec}/{self.split}/{index}", self.fingerprint_of_dataset

    def example(self, index: int) -> Example:
        value = self._images[index][self.image_column]
        image = _as_image(value, f"{self.spec} row {index} ({self.image_column})")
        return Example(image, self.caption(index), self.label(index), *self.identity(index))

    def caption(self, index: int) -> str | None:
        if self.caption_column is None:
            return None
        value = self._metadata[index][self.caption_column]
        if isinstance(value, (list, tuple)):  # several captions per image (COCO-style): the first
            value = value[0] if value else ""
        return str(value).strip() if value is not None else ""

    def label(self, index: int) -> int | None:
        if self.label_column is None:
            return None
        value = self._metadata[index][self.label_column]
        if value is None:
            raise BadExample(
                f"{self.spec} row {index}", f"no class label in column {self.label_column!r}", "bad row"
            )
        return int(value)

    @property
    def has_captions(self) -> bool:
        return self.caption_column is not None

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None

    def check_labels(self, num_classes: int) -> None:
        if self.label_column is None:
            super().check_labels(num_classes)
        import numpy as np

        column = np.asarray(self._metadata.with_format("numpy")[self.label_column], dtype=np.float64)
        present = column[~np.isnan(column)]  # rows without a label are bad samples when they are read
        if present.size == 0:
            raise BadInput(f"column {self.label_column!r} of {self.spec} holds no class labels")
        low, high = int(present.min()), int(present.max())
        for label in (low, high):
            if not 0 <= label < num_classes:
                raise label_out_of_range(label, num_classes, f"column {self.label_column!r} of {self.spec}")

    def fingerprint(self) -> str:
        """The dataset's own fingerprint (``datasets`` derives it from its files and transforms), split,
        image column and row count."""
        import hashlib

        key = f"{self.fingerprint_of_dataset}\t{self.split}\t{self.image_column}\t{len(self)}"
        return hashlib.sha256(key.encode()).hexdigest()


def _load(spec: DataSpec):
    """``(split name, Dataset)`` for the spec; errors name what is wrong (unknown split, no files...)."""
    import datasets

    text = spec.source
    try:
        if text.startswith("hf:"):
            name, _, config = text[3:].partition(":")
            loaded = _from_cache(name, config or None, datasets)
        else:
            path = Path(text).expanduser()
            if path.is_dir() and not any(path.glob("*.parquet")) and not any(path.glob("*.arrow")):
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = _from_files(text, path, datasets)
    except BadInput:
        raise
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise BadInput(f"cannot read the dataset {text}: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = spec.split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if split is None:
            raise BadInput(f"{text} has the splits {', '.join(splits)}: choose one with --split")
        if split not in loaded:
            raise BadInput(f"{text} has no split {split!r} (splits: {', '.join(splits)})")
        return split, loaded[split]
    if spec.split is not None and spec.split != (loaded.split and str(loaded.split)):
        raise BadInput(
            f"{text} is a single split ({loaded.split or 'unnamed'}); it has no split {spec.split!r}"
        )
    return str(loaded.split or "train"), loaded


def _from_files(text: str, path: Path, datasets):
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".parquet", ".arrow"))
    else:
        files = sorted(glob.glob(str(path))) if glob.has_magic(text) else [str(path)]
    if not files or not all(Path(f).is_file() for f in files):
        raise BadInput(f"data not found: {text}")
    kinds = {Path(f).suffix for f in files}
    if kinds == {".arrow"}:  # memory-mapped where they are: no copy into the datasets cache
        parts = [datasets.Dataset.from_file(f) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if kinds != {".parquet"}:
        raise BadInput(f"{text}: mix of .parquet and .arrow files; give one kind")
    return datasets.load_dataset("parquet", data_files={"train": files})


def _from_cache(name: str, config: str | None, datasets):
    """A Hub dataset through the Hugging Face cache (``HF_HUB_CACHE``), as ``dp`` reads Hub models: the
    snapshot there is used as it is, and nothing is downloaded when ``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` is set. ``datasets`` then reads the snapshot's data files (parquet, arrow,
    image folders), with the splits its file names or dataset card declare."""
    import os

    from huggingface_hub import snapshot_download

    offline = any(
        os.environ.get(variable, "").lower() in ("1", "true", "yes")
        for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    try:
        folder = snapshot_download(name, repo_type="dataset", local_files_only=offline)
    except Exception as exc:  # not cached, offline, private, no network: all the same to the user
        why = "offline mode is set" if offline else str(exc).splitlines()[0]
        raise BadInput(
            f"dataset {name} is not in the local Hugging Face cache and cannot be downloaded ({why})"
        ) from None
    return datasets.load_dataset(folder, config)


def _column(given: str | None, what: str, columns: list[str], spec: str) -> str | None:
    if given is not None and given not in columns:
        raise BadInput(f"{spec} has no column {given!r} (--{what}-column); columns: {', '.join(columns)}")
    return given


def _guess(columns: list[str], names: tuple[str, ...], accept) -> str | None:
    lowered = {column.lower(): column for column in columns}
    return next((lowered[n] for n in names if n in lowered and accept(lowered[n])), None)


def _guess_image(features) -> str | None:
    import datasets

    typed = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    return typed[0] if typed else _guess(list(features), IMAGE_NAMES, lambda name: True)


def _guess_label(features) -> str | None:
    import datasets

    typed = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if typed:
        return typed[0]
    return _guess(
        list(features),
        LABEL_NAMES,
        lambda name: isinstance(features[name], datasets.Value) and "int" in features[name].dtype,
    )


def _is_image_feature(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Image)


def _is_text(feature) -> bool:
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)  # List(Value("string")): several captions
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def _as_image(value, what: str):
    """A PIL image from what an image column holds: PIL (the Image feature), bytes, {bytes, path}, array."""
    import numpy as np
    from PIL import Image

    from dpcli.data.folder import read_image, usable_mode

    if isinstance(value, Image.Image):
        return usable_mode(value, what)
    if isinstance(value, dict):
        if value.get("bytes"):
            return read_image(io.BytesIO(value["bytes"]), what)
        if value.get("path"):
            return read_image(value["path"], what)
    if isinstance(value, (bytes, bytearray)):
        return read_image(io.BytesIO(value), what)
    if isinstance(value, (np.ndarray, list)):
        array = np.asarray(value)
        if array.dtype != np.uint8:
            raise BadExample(what, f"expected uint8 pixels, got {array.dtype}")
        try:
            return Image.fromarray(array)
        except (TypeError, ValueError) as exc:
            raise BadExample(what, f"pixels of shape {array.shape}: {exc}") from None
    raise BadExample(what, f"not an image (got {type(value).__name__})")
