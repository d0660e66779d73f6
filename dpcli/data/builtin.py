"""Built-in data: ``builtin:digits``, the UCI hand-written digits that ship with dp (1797 images, 8x8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpcli.data.base import Example, Source, label_out_of_range
from dpcli.errors import BadInput

BUILTIN_DATASETS = ("digits",)
_RESOURCES = Path(__file__).resolve().parent.parent / "resources"


def builtin_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI ML hand-written digits (1797 images, 8x8, values 0..16) and their labels (0..9).

    From the copy scikit-learn ships (E. Alpaydin, C. Kaynak, UCI Machine Learning Repository, CC BY 4.0);
    stored in the package as resources/digits.npz.
    """
    with np.load(_RESOURCES / "digits.npz", allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


class DigitsSource(Source):
    """``builtin:digits``: gray 8x8 images as float tensors in [0, 1] (resized by the transform), labels 0..9."""

    kind = "builtin"

    def __init__(self, spec: str = "builtin:digits"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            raise BadInput(
                f"unknown built-in dataset '{name}' (available: builtin:{', builtin:'.join(BUILTIN_DATASETS)})"
            )
        self.spec = spec
        images, labels = builtin_digits()
        self._pixels = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]  # 110 KB
        self._labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self._pixels)

    def identity(self, index: int) -> tuple[str, str]:
        return f"digits/{index}", "1"

    def example(self, index: int) -> Example:
        return Example(self._pixels[index], None, int(self._labels[index]), *self.identity(index))

    def caption(self, index: int) -> None:
        return None

    def label(self, index: int) -> int:
        return int(self._labels[index])

    @property
    def has_labels(self) -> bool:
        return True

    def check_labels(self, num_classes: int) -> None:
        if num_classes < 10:
            raise label_out_of_range(9, num_classes, "builtin:digits")

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256((_RESOURCES / "digits.npz").read_bytes()).hexdigest()
