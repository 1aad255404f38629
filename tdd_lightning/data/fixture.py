"""A small LAION-format shard set, generated: images of several aspect ratios with img2dataset-style json
metadata (caption, url, key, width, height, original_width, original_height, aesthetic, pwatermark,
punsafe, similarity) and a known number of bad records of each kind. Tests build it in a tmp folder.

    python -m tdd_lightning.data.fixture OUT [--shards 4] [--per-shard 12] [--seed 0]

``FIXTURE_FILTERS`` are the thresholds the bad records are bad for; ``make_laion_fixture`` returns the
count of each (exactly one reason per bad record) with the sizes of the good images.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

FIXTURE_FILTERS = {
    "min_size": 32,
    "min_aesthetic": 5.5,
    "max_watermark": 0.5,
    "max_nsfw": 0.5,
    "filters": ["similarity>=0.25"],
}
GOOD_SIZES = ((64, 64), (48, 96), (96, 48), (40, 120), (72, 64), (64, 128))  # (h, w): several aspect ratios
# bad record kinds, in the order they are spread over the shards; each fails exactly one check
BAD = {
    "min_size": 2,  # a 24 x 40 image (the json says so too)
    "min_aesthetic": 3,
    "max_watermark": 2,
    "max_nsfw": 1,
    "filter:similarity>=0.25": 1,
    "image": 1,  # image bytes that do not decode
}


def _image_bytes(h: int, w: int, rng: random.Random, fmt: str) -> bytes:
    import numpy as np
    from PIL import Image

    data = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format=fmt)
    return buf.getvalue()


def _record(i: int, kind: str, rng: random.Random) -> tuple[dict, tuple[int, int]]:
    h, w = GOOD_SIZES[i % len(GOOD_SIZES)] if kind != "min_size" else (24, 40)
    meta = {
        "caption": f"a picture number {i}",
        "url": f"https://example.com/{i}.jpg",
        "key": f"{i:09d}",
        "status": "success",
        "width": w,
        "height": h,
        "original_width": w,
        "original_height": h,
        "aesthetic": round(rng.uniform(5.6, 7.5), 3),
        "pwatermark": round(rng.uniform(0.0, 0.4), 3),
        "punsafe": round(rng.uniform(0.0, 0.2), 3),
        "similarity": round(rng.uniform(0.28, 0.4), 3),
    }
    if kind == "min_aesthetic":
        meta["aesthetic"] = round(rng.uniform(3.0, 5.4), 3)
    elif kind == "max_watermark":
        meta["pwatermark"] = round(rng.uniform(0.6, 1.0), 3)
    elif kind == "max_nsfw":
        meta["punsafe"] = round(rng.uniform(0.6, 1.0), 3)
    elif kind.startswith("filter:"):
        meta["similarity"] = 0.1
    return meta, (h, w)


def make_laion_fixture(out: str | Path, shards: int = 4, per_shard: int = 12, seed: int = 0) -> dict:
    """Write ``shards`` tar shards of ``per_shard`` records to ``out``; returns what they hold:
    ``{"shards": glob, "records", "good", "bad": {reason: n}, "good_sizes": {key: (h, w)}}``."""
    from tdd_lightning.data.shards import ShardWriter

    out = Path(out)
    total = shards * per_shard
    kinds = [k for k, n in BAD.items() for _ in range(n)]
    if total < 2 * len(kinds):
        raise ValueError(f"{total} records are too few for {len(kinds)} bad ones")
    rng = random.Random(seed)
    slots = rng.sample(range(total), len(kinds))
    kind_of = dict(zip(slots, kinds, strict=True))
    good_sizes = {}
    for s in range(shards):
        with ShardWriter(out / f"{s:05d}.tar") as w:
            for j in range(per_shard):
                i = s * per_shard + j
                kind = kind_of.get(i, "good")
                meta, (h, w_) = _record(i, kind, rng)
                fmt = "PNG" if i % 2 else "JPEG"
                image = b"not an image" if kind == "image" else _image_bytes(h, w_, rng, fmt)
                key = f"{i:09d}"
                w.write(
                    key,
                    {
                        "jpg" if fmt == "JPEG" else "png": image,
                        "txt": meta["caption"].encode(),
                        "json": json.dumps(meta).encode(),
                    },
                )
                if kind == "good":
                    good_sizes[key] = (h, w_)
    return {
        "shards": str(out / "*.tar"),
        "records": total,
        "good": len(good_sizes),
        "bad": dict(BAD),
        "good_sizes": good_sizes,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    info = make_laion_fixture(a.out, a.shards, a.per_shard, a.seed)
    print(f"wrote {info['records']} records ({info['good']} good, bad: {info['bad']}) to {a.out}")
    return info


if __name__ == "__main__":
    main()
