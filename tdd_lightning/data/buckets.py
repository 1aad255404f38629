"""Aspect-ratio buckets: the target sizes, the nearest one to an image, and which bucket each step trains.

``SDXL_BUCKETS`` is the resolution list of the SDXL report (Podell et al. 2023, appendix I): about one
megapixel, both sides multiples of 64, aspect ratios (h / w) from 0.25 to 4, as (height, width). An image
goes to the bucket whose aspect ratio is nearest in log scale (ties: the larger bucket area, then the
first listed). A bucket is named ``<h>x<w>`` (its folder in a bucketed cache).

Every rank trains the same bucket at each step (DDP and FSDP need equal shapes): step n of epoch e trains
``bucket_of_batch(seed, e, n, sizes)``, a draw in proportion to the buckets' sample counts that depends
on nothing else, so it is the same on every rank, in every worker and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tdd_lightning.errors import ConfigError

Bucket = tuple[int, int]  # (height, width) in pixels

SDXL_BUCKETS: tuple[Bucket, ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576),
    (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip
NAMED = {"sdxl": SDXL_BUCKETS}


def parse_buckets(spec, key: str = "buckets") -> tuple[Bucket, ...] | None:
    """None/"none" (square crops at ``resolution``), a name (``sdxl``) or a list of [h, w] pairs."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "null", "")):
        return None
    if isinstance(spec, str):
        if spec.lower() not in NAMED:
            raise ConfigError(key, spec, f"must be one of {', '.join(NAMED)} or a list of [height, width]")
        return NAMED[spec.lower()]
    try:
        out = tuple((int(h), int(w)) for h, w in spec)
    except (TypeError, ValueError):
        raise ConfigError(key, spec, "must be a list of [height, width] pairs") from None
    if not out or any(h <= 0 or w <= 0 for h, w in out) or len(set(out)) != len(out):
        raise ConfigError(key, spec, "needs distinct [height, width] pairs of positive sizes")
    return out


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log scale) to that of a ``height`` x ``width`` image."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 12), -b[0] * b[1]))


def bucket_name(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def bucket_of_name(name: str) -> Bucket:
    h, w = name.split("x")
    return int(h), int(w)


def bucket_of_batch(seed: int, epoch: int, n: int, sizes: Sequence[int]) -> int:
    """The index of the bucket that batch ``n`` of ``epoch`` trains on every rank: drawn with probability
    size / sum(sizes)."""
    from tdd_lightning.data.position import draw

    u = draw("bucket", seed, epoch, n) % sum(sizes)
    for i, size in enumerate(sizes):
        if u < size:
            return i
        u -= size
    raise AssertionError("unreachable")
