"""Image preprocessing that records the true geometry of every crop (for micro-conditioning).

A preprocessed sample is ``pixels`` float32 [3, H, W] in [-1, 1] (the target size is H, W), with
``original_size`` float32 [2] = (h, w), the image's size BEFORE any resize (as displayed: EXIF
orientation applied), and ``crop_top_left`` float32 [2] = (top, left), the real crop corner in the
coordinates of the resized image (after a horizontal flip, in those of the flipped resized image, so the
geometry describes exactly the pixels the model sees). The authors' TDD code records the resized size
and forces the crop to (0, 0). Turning geometry into a model's conditioning (SDXL's six time ids) is the
model family's business (``tdd_lightning.models.families``: SDXL's ``geometry``), not the data
layer's; SD1.5 ignores it.

With ``buckets`` (``tdd_lightning.data.buckets``) each image gets the target size of its nearest
aspect-ratio bucket instead of ``resolution``.

Every Pillow mode becomes 8-bit RGB by ``to_rgb`` (16-bit greyscale scaled, not clipped to white;
transparent pixels composited on ``BACKGROUND``); tests/test_data_robustness.py checks each mode
against hand-made pixel values.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from tdd_lightning.data.buckets import nearest_bucket

GEOMETRY_KEYS = ("original_size", "crop_top_left")  # what a preprocessed sample records besides pixels
BACKGROUND = (255, 255, 255)  # transparent pixels (RGBA, LA, PA, P or L/RGB with a tRNS key) become white
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # greyscale, 0..65535 (``I``: clipped to it)


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit RGB: v8 = round(v * 255 / 65535) (Pillow's convert clips v > 255 to white)."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # 2-D uint8: mode L


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, the pixel values the image shows.

    RGB without transparency is returned as it is. 16-bit greyscale (``I;16``, ``I;16B``, ``I``) is
    scaled to 8 bits. Images with an alpha channel or a transparency key (RGBA, LA, PA, P with tRNS,
    ...) are composited over ``background``. Everything else (L, P, 1, CMYK, YCbCr) goes through
    Pillow's ``convert("RGB")``.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image.convert("RGB")


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


@dataclass
class SDXLPreprocess:
    """Resize the short side (cover the target), crop, optionally flip, normalise to [-1, 1].

    ``resolution``: the target size, an int (square) or (height, width).
    ``center_crop``: centre crop; else a random crop drawn from the ``rng`` given to ``__call__``.
    ``random_flip``: horizontal flip with probability 1/2 (leave off when captions say left/right).
    ``buckets``: (height, width) targets; each image takes its nearest (``resolution`` is then unused).
    Any image mode is accepted (``to_rgb``: 16-bit scaled, transparency over ``BACKGROUND``).
    """

    resolution: int | tuple[int, int] = 1024
    center_crop: bool = True
    random_flip: bool = False
    buckets: Sequence[tuple[int, int]] | None = None

    def target(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of that size is cropped to."""
        return nearest_bucket(height, width, self.buckets) if self.buckets else _pair(self.resolution)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        """``pixels`` float32 [3, H, W] in [-1, 1], ``original_size`` and ``crop_top_left`` float32 [2]."""
        rng = rng or random.Random()
        image = ImageOps.exif_transpose(image)  # the original size is the size as displayed
        image = to_rgb(image)
        orig_w, orig_h = image.size
        th, tw = self.target(orig_h, orig_w)
        scale = max(th / orig_h, tw / orig_w)  # smallest scale that covers the target
        new_h, new_w = max(th, round(orig_h * scale)), max(tw, round(orig_w * scale))
        if (new_w, new_h) != (orig_w, orig_h):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        if self.center_crop:
            top, left = (new_h - th) // 2, (new_w - tw) // 2
        else:
            top, left = rng.randint(0, new_h - th), rng.randint(0, new_w - tw)
        image = image.crop((left, top, left + tw, top + th))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = new_w - left - tw  # the same pixels, cropped from the flipped resized image
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        pixels = pixels.float() / 127.5 - 1.0
        return {
            "pixels": pixels,
            "original_size": torch.tensor([orig_h, orig_w], dtype=torch.float32),
            "crop_top_left": torch.tensor([top, left], dtype=torch.float32),
        }
