"""The shapes dataset: deterministic, captions match the attributes, readable as raw shards; the bench."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tdd_lightning.data.shapes import COLORS, POSITIONS, SHAPES_VOCAB, ShapesConfig, make_shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes-two")
    return out, make_shapes(out, ShapesConfig("two", train=240, heldout=40, shards=4, seed=3))


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_deterministic_and_seeded(tmp_path, two):
    out, info = two
    again = make_shapes(tmp_path / "again", ShapesConfig("two", train=240, heldout=40, shards=4, seed=3))
    make_shapes(tmp_path / "other", ShapesConfig("two", train=240, heldout=40, shards=4, seed=4))
    assert info == again
    for split in ("train", "heldout"):
        shards = sorted((out / split).glob("shard-*.tar"))
        assert len(shards) == 4  # >= 4 shards per split
        for s in shards:
            assert s.read_bytes() == (tmp_path / "again" / split / s.name).read_bytes()
    assert (out / "train/shard-000000.tar").read_bytes() != (
        tmp_path / "other/train/shard-000000.tar"
    ).read_bytes()


def test_two_object_captions_match_attributes(two):
    out, info = two
    attrs = json.loads((out / "train/attributes.json").read_text())
    assert len(attrs) == 240 and info["splits"]["heldout"]["samples"] == 40
    relations = set()
    for a in attrs:
        s, o = a["objects"]
        assert a["caption"] == (
            f"a {s['size']} {s['color']} {s['shape']} {a['relation']} a {o['size']} {o['color']} {o['shape']}"
        )
        for obj in (s, o):
            assert obj["radius"] >= 5.0  # the toy autoencoder loses smaller shapes (docs/data.md)
            for c in (obj["cx"], obj["cy"]):  # inside the image (attributes rounded to 1e-3)
                assert obj["radius"] - 1e-3 <= c <= 32 - obj["radius"] + 1e-3
        gap = s["radius"] + o["radius"] - 1e-3  # the two never overlap along the relation axis
        relations.add(a["relation"])
        if a["relation"] == "left of":
            assert o["cx"] - s["cx"] >= gap
        elif a["relation"] == "right of":
            assert s["cx"] - o["cx"] >= gap
        elif a["relation"] == "above":
            assert o["cy"] - s["cy"] >= gap
        else:
            assert s["cy"] - o["cy"] >= gap
    assert relations == {"left of", "right of", "above", "below"}
    # the per-sample json in the shard is the same record
    files = members(out / "train/shard-000000.tar")
    assert json.loads(files["train-000000.json"]) == attrs[0]
    assert files["train-000000.txt"].decode() == attrs[0]["caption"]


def test_vocab_words_are_single_tokens(two):
    from tdd_lightning.models.tokenizer import make_clip_tokenizer

    out, _ = two
    tok = make_clip_tokenizer(SHAPES_VOCAB)
    captions = [a["caption"] for a in json.loads((out / "train/attributes.json").read_text())]
    captions += [f"a red circle at the {p}" for p in POSITIONS]
    for caption in captions:
        assert set(caption.split()) <= set(SHAPES_VOCAB)
    split = {w: tok.tokenize(w) for w in SHAPES_VOCAB if tok.tokenize(w) != [w + "</w>"]}
    assert not split, f"make_clip_tokenizer(SHAPES_VOCAB) splits {split}"
    caption = "a small red circle above a large blue square"
    assert tok.tokenize(caption) == [w + "</w>" for w in caption.split()]


def test_one_object_pixels_show_the_colour_and_position(tmp_path):
    import io

    from PIL import Image

    out = tmp_path / "one"
    make_shapes(out, ShapesConfig("one", train=60, heldout=12, shards=4))
    attrs = json.loads((out / "train/attributes.json").read_text())
    files = members(out / "train/shard-000000.tar")
    for a in attrs[:15]:
        (obj,) = a["objects"]
        assert (
            a["caption"] == f"a {obj['color']} {obj['shape']} at the {a['position']}" and obj["radius"] >= 5
        )
        img = np.asarray(Image.open(io.BytesIO(files[a["key"] + ".png"])).convert("RGB")).astype(int)
        assert img.shape == (32, 32, 3)
        centre = img[int(obj["cy"]), int(obj["cx"])]
        assert np.abs(centre - np.array(COLORS[obj["color"]])).max() <= 14  # jitter 12 + rounding
        assert np.abs(img[0, 0] - centre).max() > 40 or np.abs(img[31, 31] - centre).max() > 40  # background


def test_raw_datamodule_reads_shapes(two):
    from tdd_lightning.data.datamodule import ShardDataModule

    out, _ = two
    dm = ShardDataModule(str(out / "heldout/shard-*.tar"), batch_size=16, num_workers=2, resolution=32)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["caption"]) for b in batches) == 40 and dm.skipped == 0
    assert batches[0]["pixels"].shape[1:] == (3, 32, 32)
    assert batches[0]["original_size"][0].tolist() == [32, 32]
    assert batches[0]["crop_top_left"][0].tolist() == [0, 0]


def test_make_shapes_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "data/make_shapes.py"), "--out", str(out), "--difficulty", "one"]
    res = subprocess.run(
        cmd + ["--train", "100", "--heldout", "20"], capture_output=True, text=True, check=True
    )
    assert "train 100 in 8 shards" in res.stdout
    assert json.loads((out / "info.json").read_text())["vocab"] == SHAPES_VOCAB


def test_bench_prints_loader_and_training_rates(capsys):
    from tdd_lightning.data.bench import main

    ratio = main(
        [
            "--samples",
            "256",
            "--workers",
            "0",
            "--epochs",
            "1",
            "--steps",
            "1",
            "--threads",
            "1",
            "--min-ratio",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert "samples/s" in out and out.strip().splitlines()[-1].startswith("bench-data: loader")
    assert ratio > 0
