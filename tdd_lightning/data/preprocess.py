"""SDXL image preprocessing with correct micro-conditioning.

SDXL (Podell et al. 2023, sec. 2.2) conditions the UNet on six numbers: the ORIGINAL image size
(before any resize), the top-left corner of the crop, and the target size. The authors' TDD code
records the resized size and forces the crop to (0, 0); here both are the real values:

    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)

with the crop corner in the coordinates of the resized image (after a horizontal flip, in those of
the flipped resized image, so the ids describe exactly the pixels the model sees).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps


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
    """

    resolution: int | tuple[int, int] = 1024
    center_crop: bool = True
    random_flip: bool = False

    def __call__(
        self, image: Image.Image, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``pixels`` float32 [3, H, W] in [-1, 1] and ``time_ids`` float32 [6]."""
        rng = rng or random.Random()
        image = ImageOps.exif_transpose(image)  # the original size is the size as displayed
        if image.mode != "RGB":
            image = image.convert("RGB")
        orig_w, orig_h = image.size
        th, tw = _pair(self.resolution)
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
        time_ids = torch.tensor([orig_h, orig_w, top, left, th, tw], dtype=torch.float32)
        return pixels, time_ids
