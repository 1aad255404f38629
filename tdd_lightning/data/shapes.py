"""The shapes dataset: small RGB images of coloured shapes with captions, seeded and deterministic.

Difficulty ``one``: one shape at one of five positions, "a red circle at the top left".
Difficulty ``two``: two shapes, each small or large, in a spatial relation,
"a small red circle left of a large blue square" (TOY_NOTES.md: the one-object task is too easy to
tell a 4-step student from its teacher; this one leaves headroom).

Shapes are soft-edged (1 px anti-aliasing from a signed distance), on a dark tinted background, with
half-extent ("radius") >= 5 px at 32x32 (the toy autoencoder loses smaller ones). Sizes scale with the
image side. Only numpy and PIL are imported: building the default dataset takes seconds.
Each word of every caption is in ``SHAPES_VOCAB`` (for a word-level tokenizer, one token per word).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # name -> RGB; each sample jitters the channels by up to COLOR_JITTER
    "red": (225, 45, 45),
    "green": (45, 185, 65),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 215),
    "white": (235, 235, 235),
}
COLOR_JITTER = 12
BACKGROUND_MAX = 50  # background: a uniform dark tint, each channel in [0, BACKGROUND_MAX]
# difficulty one: object centres as fractions of the side (9, 16, 23 px at 32), jittered +-POS_JITTER px
POSITIONS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
POS_JITTER = 2.0
RADIUS_ONE = (5.0, 7.0)  # difficulty one: half-extent in px at a 32 px side
SIZES = {"small": (5.0, 5.5), "large": (7.0, 8.0)}  # difficulty two (two large ones still fit side by side)
RELATIONS = ("left of", "right of", "above", "below")
PERP_JITTER = 2.0  # difficulty two: offset of each object from the shared line across the relation axis
SPLITS = ("train", "heldout")
DIFFICULTIES = ("one", "two")


def shapes_vocab() -> list[str]:
    """Every word any caption can contain, sorted."""
    words = {"a", "at", "the"}
    words.update(SHAPES, COLORS, SIZES)
    for phrase in list(POSITIONS) + list(RELATIONS):
        words.update(phrase.split())
    return sorted(words)


SHAPES_VOCAB = shapes_vocab()


# ---- sampling attributes ---------------------------------------------------------------------------
def _object(rng: np.random.Generator, radius: float, cx: float, cy: float, label: str | None) -> dict:
    obj = {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS)))}
    if label is not None:
        obj["size"] = label
    return obj | {"radius": round(radius, 3), "cx": round(cx, 3), "cy": round(cy, 3)}


def sample_one(rng: np.random.Generator, size: int = 32) -> dict:
    """Attributes and caption of a one-object scene."""
    k = size / 32
    position = str(rng.choice(list(POSITIONS)))
    r = rng.uniform(*RADIUS_ONE) * k
    fx, fy = POSITIONS[position]
    cx, cy = (np.clip(f * size + rng.uniform(-POS_JITTER, POS_JITTER) * k, r, size - r) for f in (fx, fy))
    obj = _object(rng, r, float(cx), float(cy), None)
    caption = f"a {obj['color']} {obj['shape']} at the {position}"
    return {"caption": caption, "position": position, "objects": [obj]}


def sample_two(rng: np.random.Generator, size: int = 32) -> dict:
    """Attributes and caption of a two-object scene: subject, relation, reference object."""
    k = size / 32
    relation = str(rng.choice(RELATIONS))
    labels = [str(rng.choice(list(SIZES))) for _ in range(2)]
    ra, rb = (rng.uniform(*SIZES[lab]) * k for lab in labels)
    # along the relation axis: margin, object, gap, object, margin; the three spaces share the slack
    u0, u1 = np.sort(rng.uniform(0, size - 2 * ra - 2 * rb, 2))
    first, second = u0 + ra, u0 + 2 * ra + (u1 - u0) + rb  # subject first (left of / above)
    if relation in ("right of", "below"):
        first, second = size - first, size - second
    line = rng.uniform(max(ra, rb), size - max(ra, rb))
    pa, pb = (np.clip(line + rng.uniform(-PERP_JITTER, PERP_JITTER) * k, r, size - r) for r in (ra, rb))
    horizontal = relation in ("left of", "right of")
    (ax, ay), (bx, by) = ((first, pa), (second, pb)) if horizontal else ((pa, first), (pb, second))
    a = _object(rng, ra, float(ax), float(ay), labels[0])
    b = _object(rng, rb, float(bx), float(by), labels[1])
    caption = f"a {a['size']} {a['color']} {a['shape']} {relation} a {b['size']} {b['color']} {b['shape']}"
    return {"caption": caption, "relation": relation, "objects": [a, b]}


# ---- rendering --------------------------------------------------------------------------------------
def _sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) of a shape of half-extent r centred at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "triangle":  # equilateral, pointing up, circumradius R, bounding box centred
        c, s, R = np.sqrt(3) / 2, 0.5, 1.15 * r
        dy = dy - 0.25 * R
        return np.maximum.reduce([dy - s * R, c * dx - s * dy - s * R, -c * dx - s * dy - s * R])
    if shape == "cross":  # a plus sign, arms of half-width r/3
        w = r / 3
        return np.minimum(
            np.maximum(np.abs(dx) - r, np.abs(dy) - w), np.maximum(np.abs(dx) - w, np.abs(dy) - r)
        )
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scenes: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render scenes (batched) -> uint8 [N, size, size, 3]; colours jittered and background drawn from rng."""
    n = len(scenes)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    img = np.broadcast_to(rng.uniform(0, BACKGROUND_MAX, (n, 1, 1, 3)), (n, size, size, 3)).copy()
    for slot in range(max(len(s["objects"]) for s in scenes)):
        objs = [s["objects"][slot] if slot < len(s["objects"]) else None for s in scenes]
        present = np.array([o is not None for o in objs])
        get = np.vectorize(lambda o, f: o[f] if o is not None else 0.0, otypes=[np.float32])
        cx, cy, r = (get(np.array(objs, dtype=object), f)[:, None, None] for f in ("cx", "cy", "radius"))
        alpha = np.zeros((n, size, size), np.float32)
        for shape in SHAPES:
            sel = np.array([o is not None and o["shape"] == shape for o in objs])
            if sel.any():
                d = _sdf(shape, xs - cx[sel], ys - cy[sel], r[sel])
                alpha[sel] = np.clip(0.5 - d, 0.0, 1.0)
        base = np.array([COLORS[o["color"]] if o is not None else (0, 0, 0) for o in objs], np.float32)
        color = np.clip(base + rng.uniform(-COLOR_JITTER, COLOR_JITTER, (n, 3)), 0, 255)
        a = (alpha * present[:, None, None])[..., None]
        img = img * (1 - a) + color[:, None, None, :] * a
    return np.round(img).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---- writing ----------------------------------------------------------------------------------------
@dataclass
class ShapesConfig:
    difficulty: str = "two"  # one | two
    size: int = 32  # image side in px
    train: int = 20000  # samples in the train split
    heldout: int = 2000  # samples in the held-out split
    shards: int = 8  # shards per split (>= workers x ranks that will read it)
    seed: int = 0


def make_shapes(out: str | Path, cfg: ShapesConfig) -> dict:
    """Write ``out/{train,heldout}/shard-NNNNNN.tar`` (png + txt + json per sample),
    ``out/{split}/attributes.json`` (all samples' attributes) and ``out/info.json``. Returns the info."""
    from tdd_lightning.data.shards import ShardWriter

    if cfg.difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {cfg.difficulty!r}")
    if cfg.size < 32 or cfg.shards < 1:
        raise ValueError("size must be >= 32 px (shapes keep a >= 5 px radius) and shards >= 1")
    sample = sample_one if cfg.difficulty == "one" else sample_two
    out = Path(out)
    info = {
        "difficulty": cfg.difficulty,
        "size": cfg.size,
        "seed": cfg.seed,
        "vocab": SHAPES_VOCAB,
        "splits": {},
    }
    for split_id, split in enumerate(SPLITS):
        n = cfg.train if split == "train" else cfg.heldout
        rng = np.random.default_rng([cfg.seed, split_id, DIFFICULTIES.index(cfg.difficulty)])
        scenes = [sample(rng, cfg.size) for _ in range(n)]
        images = render(scenes, cfg.size, rng) if n else np.zeros((0, cfg.size, cfg.size, 3), np.uint8)
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("shard-*.tar"):
            old.unlink()
        shards = min(cfg.shards, max(n, 1))
        bounds = np.linspace(0, n, shards + 1).round().astype(int)
        attributes = []
        for s in range(shards):
            with ShardWriter(folder / f"shard-{s:06d}.tar") as writer:
                for i in range(bounds[s], bounds[s + 1]):
                    key = f"{split}-{i:06d}"
                    attrs = {"key": key, "split": split, "difficulty": cfg.difficulty, **scenes[i]}
                    attributes.append(attrs)
                    files = {
                        "png": _png(images[i]),
                        "txt": attrs["caption"].encode(),
                        "json": json.dumps(attrs).encode(),
                    }
                    writer.write(key, files)
        (folder / "attributes.json").write_text(json.dumps(attributes))
        info["splits"][split] = {
            "samples": n,
            "shards": shards,
            "pattern": f"{split}/shard-{{000000..{shards - 1:06d}}}.tar",
        }
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info
