"""Calibration data: image folders and the built-in digits."""

import pytest
from conftest import make_image_folder

from dpcli.data import load_images
from dpcli.errors import BadInput


def test_builtin_digits_at_16px_in_range():
    images = load_images("builtin:digits", size=16, channels=1)
    assert images.shape == (1797, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.3


def test_folder_is_recursive_resized_and_scaled(image_folder):
    images = load_images(str(image_folder), size=16, channels=3)
    assert images.shape == (8, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    gray = load_images(str(image_folder), size=8, channels=1, limit=3)
    assert gray.shape == (3, 1, 8, 8)


def test_unreadable_image_is_named(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", count=2)
    bad = folder / "class0" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadInput, match="broken.png"):
        load_images(str(folder), size=16, channels=3)


def test_empty_folder_and_unknown_builtin(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no images"):
        load_images(str(tmp_path / "empty"), size=16, channels=3)
    with pytest.raises(BadInput, match="unknown built-in dataset"):
        load_images("builtin:cifar", size=16, channels=3)
