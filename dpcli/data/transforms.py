"""From a decoded example to the tensor a model sees: resize, crop, flip, scale to [-1, 1].

The random choices (flip, crop offset) come from a generator the caller seeds per sample position, so a
training batch is the same whichever process or DataLoader worker decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpcli.errors import BadInput

CROPS = ("center", "random")


@dataclass(frozen=True)
class Geometry:
    """Where a transformed image came from: ``original_size`` (height, width) before resizing and
    ``crop_top_left`` (top, left) of the crop in the resized image."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``size`` (bicubic; bilinear for built-in float images), crop a
    ``size`` x ``size`` square (``center`` or ``random``), flip horizontally with probability 1/2 when
    ``flip``, convert to ``channels`` (1: gray, 3: RGB) and scale to [-1, 1]."""

    size: int
    channels: int
    crop: str = "center"
    flip: bool = False

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise BadInput(f"cannot convert images to {self.channels} channels (supported: 1 or 3)")
        if self.crop not in CROPS:
            raise BadInput(f"unknown crop {self.crop!r} (choose {' or '.join(CROPS)})")

    @property
    def random(self) -> bool:
        """Whether the result depends on the generator."""
        return self.flip or self.crop == "random"

    def key(self) -> str:
        """What identifies the transform's deterministic part (the latent cache keys on it)."""
        return f"{self.size}px-{self.channels}ch-{self.crop}"

    def flips(self, generator: torch.Generator | None) -> bool:
        """Draw the flip decision (first, so it is known before the image is decoded)."""
        return self.flip and generator is not None and bool(torch.rand(1, generator=generator) < 0.5)

    def __call__(self, image, generator: torch.Generator | None = None, flip: bool | None = None):
        """``image`` (PIL, or a float tensor [C, H, W] in [0, 1]) as a float tensor [channels, size, size]
        in [-1, 1], and whether it was flipped. ``flip`` overrides the drawn decision (already drawn with
        ``flips``)."""
        pixels, flip, _ = self.apply(image, generator, flip)
        return pixels, flip

    def apply(self, image, generator: torch.Generator | None = None, flip: bool | None = None):
        """As ``__call__``, plus the image's ``Geometry``: its size before resizing and the top-left corner
        of the crop in the resized image (SDXL's micro-conditioning). As in diffusers'
        ``train_text_to_image_sdxl.py``, a flipped image's crop corner is the one in the flipped image."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        flip = self.flips(generator) if flip is None else flip
        if isinstance(image, torch.Tensor):
            pixels = image
            if pixels.shape[0] != self.channels:
                if pixels.shape[0] != 1:
                    raise BadInput(f"cannot convert {pixels.shape[0]}-channel images to {self.channels}")
                pixels = pixels.expand(self.channels, -1, -1)
            mode = InterpolationMode.BILINEAR
        else:
            pixels = image.convert("L" if self.channels == 1 else "RGB")
            mode = InterpolationMode.BICUBIC
        height, width = F.get_size(pixels)
        original = (int(height), int(width))
        if min(height, width) != self.size:
            pixels = F.resize(
                pixels, [self.size], interpolation=mode, antialias=not isinstance(image, torch.Tensor)
            )
        height, width = F.get_size(pixels)
        if self.crop == "random" and generator is not None:
            top = int(torch.randint(0, height - self.size + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - self.size + 1, (1,), generator=generator))
            pixels = F.crop(pixels, top, left, self.size, self.size)
        else:
            # torchvision's center_crop rounds the offsets as diffusers' SDXL script does
            top = max(0, int(round((height - self.size) / 2.0)))
            left = max(0, int(round((width - self.size) / 2.0)))
            if (height, width) != (self.size, self.size):
                pixels = F.center_crop(pixels, [self.size, self.size])
        if flip:
            pixels = F.horizontal_flip(pixels)
            left = max(0, width - self.size - left)  # the same pixels, cropped from the flipped image
        geometry = Geometry(original, (top, left))
        if isinstance(pixels, torch.Tensor):
            return (pixels.clamp(0, 1) * 2 - 1).contiguous(), flip, geometry
        array = F.pil_to_tensor(pixels).float() / 127.5 - 1.0
        return array.contiguous(), flip, geometry
