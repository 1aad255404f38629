"""Aspect-ratio buckets and LAION-style filters on the generated LAION-format fixture: the encoder's
buckets and true geometry (hand-computed time ids), one shape per batch, bucket frequencies, the same
bucket on every rank, and filter counts equal to the fixture's known bad records (encode and raw mode)."""

import json
import math

import pytest
import torch

from tdd_lightning.data.buckets import SDXL_BUCKETS, bucket_of_batch, nearest_bucket, parse_buckets
from tdd_lightning.data.datamodule import ShardDataModule
from tdd_lightning.data.encode import main as encode_main
from tdd_lightning.data.filters import SampleFilter
from tdd_lightning.data.fixture import BAD, FIXTURE_FILTERS, make_laion_fixture
from tdd_lightning.errors import ConfigError
from tests.test_data_resume import _stream

BUCKETS = "32x32,24x48,48x24,16x64"  # multiples of the tiny VAE's factor 8
# hand-computed: (h, w) -> (bucket, crop top, crop left) with a centre crop after covering the bucket
GEOMETRY = {
    (64, 64): ((32, 32), 0, 0),  # halved, no crop
    (48, 96): ((24, 48), 0, 0),  # ratio 1/2: exactly halved
    (96, 48): ((48, 24), 0, 0),
    (40, 120): ((16, 64), 2, 0),  # ratio 1/3 -> 1/4 bucket; 64/120 scale: 21 x 64, top (21 - 16) // 2
    (72, 64): ((32, 32), 2, 0),  # ratio 1.125 -> square; scale 1/2: 36 x 32, top 2
    (64, 128): ((24, 48), 0, 0),  # scale 3/8 both ways
}
FILTER_ARGS = ["--min-size", "32", "--min-aesthetic", "5.5", "--max-watermark", "0.5", "--max-nsfw", "0.5",
               "--filter", "similarity>=0.25"]  # fmt: skip


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    folder = tmp_path_factory.mktemp("laion")
    return make_laion_fixture(folder / "raw", shards=4, per_shard=12, seed=0)


@pytest.fixture(scope="module")
def bucketed(laion, tiny_sdxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "bucketed"
    args = ["--model", str(tiny_sdxl_dir), "--buckets", BUCKETS, "--batch-size", "4", "--num-workers", "2"]
    meta = encode_main([laion["shards"], str(out), *args, "--no-progress", *FILTER_ARGS])
    return out, meta


def test_sdxl_bucket_list_and_nearest():
    assert len(SDXL_BUCKETS) == 40 and (1024, 1024) in SDXL_BUCKETS
    assert all(h % 64 == 0 and w % 64 == 0 and 0.85e6 < h * w < 1.15e6 for h, w in SDXL_BUCKETS)
    assert parse_buckets("sdxl") == SDXL_BUCKETS and parse_buckets(None) is None
    assert parse_buckets([[32, 32], [24, 48]]) == ((32, 32), (24, 48))
    assert nearest_bucket(1000, 1000, SDXL_BUCKETS) == (1024, 1024)
    assert nearest_bucket(2000, 1000, SDXL_BUCKETS) == (1408, 704)  # ratio 2 exactly
    assert nearest_bucket(720, 1280, SDXL_BUCKETS) == (768, 1344)  # 16:9 landscape: 0.5625 vs 0.571
    with pytest.raises(ConfigError, match="buckets"):
        parse_buckets("square-ish")


def test_encode_buckets_geometry_and_filter_counts(bucketed, laion):
    out, meta = bucketed
    assert meta["filtered"] == {k: v for k, v in BAD.items() if k != "image"}  # the known bad records
    assert meta["skipped"] == {"image": BAD["image"]}
    assert meta["samples"] == laion["good"] == 48 - sum(BAD.values())
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["filters"] == {
        **{"min_size": 32.0, "min_aesthetic": 5.5, "max_watermark": 0.5, "max_nsfw": 0.5},
        "filter": ["similarity>=0.25"],
    }
    buckets = on_disk["buckets"]
    assert len(buckets) >= 3 and set(buckets) <= {"32x32", "24x48", "48x24", "16x64"}
    want = {}
    for key, size in laion["good_sizes"].items():
        (th, tw), top, left = GEOMETRY[size]
        want[key] = ([*size, top, left, th, tw], f"{th}x{tw}")
    assert {n: b["samples"] for n, b in buckets.items()} == {
        n: sum(1 for v in want.values() if v[1] == n) for n in buckets
    }
    from tdd_lightning.data.dataset import CachedDecoder
    from tdd_lightning.data.shards import iter_tar_samples

    seen = 0
    for name, info in buckets.items():
        th, tw = (int(v) for v in name.split("x"))
        assert info["latent_shape"] == [4, th // 8, tw // 8]
        for shard in sorted((out / name).glob("*.tar")):
            for sample in iter_tar_samples(str(shard), lambda *a: None):
                got = CachedDecoder()(sample, None)
                ids, bucket = want[sample["__key__"].rsplit("/", 1)[-1]]
                assert bucket == name and got["time_ids"].tolist() == ids
                assert list(got["latents"].shape) == info["latent_shape"]
                seen += 1
    assert seen == laion["good"]


def _bucket_module(out, rank, world, monkeypatch, **kw):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm = ShardDataModule(str(out / "*" / "*.tar"), mode="cached", batch_size=2, num_workers=2, resampled=True,
                         samples_per_epoch=80, **kw)  # fmt: skip
    dm.setup("fit")
    return dm


def test_bucketed_batches_one_shape_same_bucket_on_both_ranks(bucketed, monkeypatch):
    out, meta = bucketed
    sizes = {n: b["samples"] for n, b in meta["buckets"].items()}
    names = sorted(sizes)
    shapes = []
    for rank in (0, 1):
        dm = _bucket_module(out, rank, 2, monkeypatch, buckets=[[32, 32], [24, 48], [48, 24], [16, 64]])
        batches = list(dm.train_dataloader())
        assert len(batches) == 80 // 2 // 2  # samples_per_epoch over 2 ranks, batches of 2
        for b in batches:
            assert b["latents"].shape[0] == 2  # one shape per batch (stack would fail otherwise)
            assert b["time_ids"][:, 4:].unique(dim=0).shape[0] == 1
        shapes.append([tuple(b["latents"].shape[2:]) for b in batches])
        want = [names[bucket_of_batch(dm.seed, 0, n, [sizes[k] for k in names])] for n in range(len(batches))]
        assert [f"{h * 8}x{w * 8}" for h, w in shapes[-1]] == want  # the schedule, worker order included
    assert shapes[0] == shapes[1]  # every step: the same bucket on both ranks
    assert len(set(shapes[0])) >= 3


def test_bucket_frequencies_match_sizes():
    sizes = [5, 12, 20, 3]
    n = 20000
    counts = [0] * 4
    for i in range(n):
        counts[bucket_of_batch(0, 0, i, sizes)] += 1
    for c, s in zip(counts, sizes, strict=True):
        p = s / sum(sizes)
        assert abs(c - n * p) < 4 * math.sqrt(n * p * (1 - p))  # 4 sigma
    assert [bucket_of_batch(0, 1, i, sizes) for i in range(50)] != [
        bucket_of_batch(0, 0, i, sizes) for i in range(50)
    ]


def test_bucketed_cache_resumes_exactly(bucketed, monkeypatch):
    out, _ = bucketed

    straight = _stream(_bucket_module(out, 0, 1, monkeypatch), 50)  # 40 steps an epoch: crosses one
    first = _bucket_module(out, 0, 1, monkeypatch)
    assert _stream(first, 17) == straight[:17]
    again = _bucket_module(out, 0, 1, monkeypatch)
    again.load_state_dict(first.state_dict())
    assert _stream(again, 33) == straight[17:]


def test_buckets_are_refused_where_they_cannot_work(laion, tmp_path):
    with pytest.raises(ConfigError, match="buckets need the offline cache"):
        ShardDataModule(laion["shards"], mode="raw", buckets="sdxl")


def test_raw_mode_filters_count_the_known_bad_records(laion):
    dm = ShardDataModule(laion["shards"], batch_size=2, num_workers=2, resolution=32,
                         **{k: v for k, v in FIXTURE_FILTERS.items()})  # fmt: skip
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == sorted(laion["good_sizes"])
    assert dm.skipped_by_reason() == BAD


def test_filter_expressions():
    f = SampleFilter(min_size=32, filters=["similarity>=0.25", "status==success", "lang!=fr"])
    assert f.reasons == ("min_size", "filter:similarity>=0.25", "filter:status==success", "filter:lang!=fr")
    good = {"width": 64, "height": 40, "similarity": 0.3, "status": "success", "lang": "en"}
    assert f.check_metadata(good) is None
    assert f.check_metadata({**good, "height": 31}) == "min_size"
    assert f.check_metadata({**good, "similarity": "n/a"}) == "filter:similarity>=0.25"  # unknown fails
    assert f.check_metadata({**good, "lang": "fr"}) == "filter:lang!=fr"
    assert SampleFilter(min_aesthetic=5.5).check_metadata({"AESTHETIC_SCORE": 6.1}) is None
    assert SampleFilter(max_nsfw=0.5).check_metadata({"punsafe": None}) == "max_nsfw"
    assert f.check_size({}, 20, 50) == "min_size" and f.check_size({}, 40, 50) is None
    with pytest.raises(ConfigError, match="key<op>value"):
        SampleFilter(filters=["similarity ~ 3"])


def test_geometry_gives_sdxl_time_ids():
    from tdd_lightning.models.families.sdxl import SDXL

    ids = SDXL.geometry(torch.tensor([[40.0, 120]]), torch.tensor([[2.0, 0]]), (16, 64))["time_ids"]
    assert ids.tolist() == [[40, 120, 2, 0, 16, 64]] and ids.dtype == torch.float32
