"""Shapes images and attributes in memory (uint8 -> [-1, 1] tensors) and canonical attribute labels.

A two-object caption "A left of B" shows the same picture as "B right of A", so labels are
canonical: the relation's axis (horizontal | vertical) and the attributes of the first object
(left or top) and the second object. A classifier can predict those from pixels alone.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from tdd_lightning.data.shapes import COLORS, SHAPES, SIZES

AXES = ("horizontal", "vertical")
# head name -> class names; one classifier head each (prompt accuracy: all heads right)
HEADS = {
    "axis": AXES,
    "first_size": tuple(SIZES),
    "first_color": tuple(COLORS),
    "first_shape": SHAPES,
    "second_size": tuple(SIZES),
    "second_color": tuple(COLORS),
    "second_shape": SHAPES,
}


def canonical_labels(attrs: dict) -> dict[str, int]:
    """Class index per head for a two-object scene's attributes (subject/reference made canonical)."""
    a, b = attrs["objects"]
    rel = attrs["relation"]
    first, second = (b, a) if rel in ("right of", "below") else (a, b)
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    out = {"axis": AXES.index(axis)}
    for name, obj in (("first", first), ("second", second)):
        out[f"{name}_size"] = HEADS[f"{name}_size"].index(obj["size"])
        out[f"{name}_color"] = HEADS[f"{name}_color"].index(obj["color"])
        out[f"{name}_shape"] = HEADS[f"{name}_shape"].index(obj["shape"])
    return out


def labels_tensor(attributes: list[dict]) -> torch.Tensor:
    """[N, len(HEADS)] long labels in HEADS order."""
    rows = [[canonical_labels(a)[h] for h in HEADS] for a in attributes]
    return torch.tensor(rows, dtype=torch.long)


def load_split(root: str | Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """All images of ``root/split`` as uint8 [N, 3, H, W] and their attribute dicts (shard order)."""
    from PIL import Image

    images, attributes = [], []
    for shard in sorted((Path(root) / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(members):
            files = members[key]
            images.append(np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB")))
            attributes.append(json.loads(files["json"]))
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, attributes


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
