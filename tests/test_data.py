"""Raw shards -> batches: SDXL time ids, bad input skipped and counted, disjoint reads per rank/worker."""

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tdd_lightning.data.datamodule import ShardDataModule, SkippedSamplesLogger
from tdd_lightning.data.dataset import NoValidSamplesError
from tdd_lightning.data.preprocess import SDXLPreprocess
from tdd_lightning.data.shards import ShardWriter, expand_shards
from tdd_lightning.errors import ConfigError


def noise_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder, n_shards: int, per_shard: int, size=(16, 16), prefix="s") -> list[str]:
    """``n_shards`` shards of noise images with captions; keys ``{prefix}{shard}-{i}``."""
    paths = []
    for s in range(n_shards):
        path = folder / f"{prefix}-{s:06d}.tar"
        with ShardWriter(path) as w:
            for i in range(per_shard):
                img = noise_image(*size, seed=1000 * s + i)
                w.write(f"{prefix}{s}-{i}", {"png": png(img), "txt": f"caption {s} {i}".encode()})
        paths.append(str(path))
    return paths


def keys_of(dm: ShardDataModule) -> list[str]:
    return [k for batch in dm.train_dataloader() for k in batch["key"]]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# ---- preprocessing ------------------------------------------------------------------------------
def batch_ids(batch):
    """The SDXL family's six time ids of a raw batch's geometry (the preprocessing is family-neutral)."""
    from tdd_lightning.models.families.sdxl import SDXL

    return SDXL.geometry(batch["original_size"], batch["crop_top_left"], batch["pixels"].shape[-2:])[
        "time_ids"
    ]


def sdxl_ids(preprocess, image, rng=None):
    """(pixels, the SDXL time ids of the image's geometry)."""
    out = preprocess(image, rng)
    assert set(out) == {"pixels", "original_size", "crop_top_left"}
    batch = {k: v[None] for k, v in out.items()}
    return out["pixels"], batch_ids(batch)[0]


def test_preprocess_time_ids_are_true_size_and_real_crop():
    # no resize needed (short side = target): the crop must be exactly the recorded window
    img = noise_image(32, 48, seed=0)  # h=32, w=48
    rng = random.Random(0)
    lefts = set()
    for _ in range(20):
        pixels, ids = sdxl_ids(SDXLPreprocess(32, center_crop=False), img, rng)
        orig_h, orig_w, top, left, th, tw = ids.int().tolist()
        assert (orig_h, orig_w, top, th, tw) == (32, 48, 0, 32, 32) and 0 <= left <= 16
        assert np.array_equal(to_uint8(pixels), np.asarray(img)[:, left : left + 32])
        lefts.add(left)
    assert len(lefts) > 3  # really random
    _, ids = sdxl_ids(SDXLPreprocess(32, center_crop=True), img)
    assert ids.tolist() == [32, 48, 0, 8, 32, 32]

    # resized (64x96 -> 32x48): original size before resize, crop corner in resized coordinates
    big = noise_image(64, 96, seed=1)
    resized = np.asarray(big.resize((48, 32), Image.BICUBIC))
    pixels, ids = sdxl_ids(SDXLPreprocess(32, center_crop=False), big, random.Random(3))
    orig_h, orig_w, top, left, _, _ = ids.int().tolist()
    assert (orig_h, orig_w) == (64, 96)
    assert np.array_equal(to_uint8(pixels), resized[top : top + 32, left : left + 32])

    # flip: the corner is that of the same pixels in the flipped resized image
    flips = 0
    for seed in range(10):
        pixels, ids = sdxl_ids(
            SDXLPreprocess(32, center_crop=False, random_flip=True), big, random.Random(seed)
        )
        out, left = to_uint8(pixels), int(ids[3])
        flipped = np.array_equal(out, resized[:, ::-1][:, left : left + 32])
        assert flipped or np.array_equal(out, resized[:, left : left + 32])
        flips += flipped
    assert 0 < flips < 10

    # non-square target, portrait source: the image covers the target
    pixels, ids = sdxl_ids(SDXLPreprocess((24, 40), center_crop=True), noise_image(100, 50, seed=2))
    assert pixels.shape == (3, 24, 40) and ids.tolist() == [100, 50, 28, 0, 24, 40]  # resized to 80 x 40
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0


# ---- raw shards -> batch ------------------------------------------------------------------------
def test_raw_shards_to_batch_with_known_size_and_crop(tmp_path):
    hand_made = noise_image(32, 48, seed=7)  # known original size 32 x 48
    with ShardWriter(tmp_path / "raw-000000.tar") as w:
        w.write("hand", {"png": png(hand_made), "txt": b"a hand-made image"})
        w.write("big", {"jpg": png(noise_image(64, 96, seed=8)), "txt": b"a large one"})
        w.write(
            "meta",
            {"webp": png(noise_image(40, 32, seed=9)), "json": json.dumps({"caption": "from json"}).encode()},
        )
    dm = ShardDataModule(
        str(tmp_path / "raw-{000000..000000}.tar"), batch_size=3, num_workers=0, resolution=32
    )
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (3, 2)
    assert batch["original_size"].dtype == batch["crop_top_left"].dtype == torch.float32
    batch["time_ids"] = batch_ids(batch)
    assert dm.uncond is None and dm.skipped == 0
    i = {k: j for j, k in enumerate(batch["key"])}
    assert sorted(batch["caption"]) == ["a hand-made image", "a large one", "from json"]
    orig_h, orig_w, top, left, th, tw = batch["time_ids"][i["hand"]].int().tolist()
    assert (orig_h, orig_w, top, th, tw) == (32, 48, 0, 32, 32)
    assert np.array_equal(to_uint8(batch["pixels"][i["hand"]]), np.asarray(hand_made)[:, left : left + 32])
    assert batch["time_ids"][i["big"]][:2].tolist() == [64, 96]
    assert batch["time_ids"][i["meta"]][:2].tolist() == [40, 32]


def test_missing_shard_path_fails_when_built_naming_it(tmp_path):
    write_shards(tmp_path, 1, 2)
    with pytest.raises(ConfigError, match=r"^train_shards=.* is invalid: shard not found: .*nope-000001.tar"):
        ShardDataModule([str(tmp_path / "s-000000.tar"), str(tmp_path / "nope-000001.tar")], num_workers=0)
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards(str(tmp_path / "missing-*.tar"))
    with pytest.raises(ValueError, match="mode"):
        ShardDataModule("x.tar", mode="latents")


# ---- bad input ----------------------------------------------------------------------------------
def test_truncated_shard_is_skipped_counted_and_training_continues(tmp_path):
    import lightning as L

    write_shards(tmp_path, 3, 6)
    bad = tmp_path / "s-000003.tar"
    with ShardWriter(bad) as w:
        for i in range(6):
            w.write(f"bad-{i}", {"png": png(noise_image(16, 16, seed=i)), "txt": b"x"})
    bad.write_bytes(bad.read_bytes()[: int(bad.stat().st_size * 0.55)])  # cut mid-sample

    dm = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=4, num_workers=2, resolution=16)
    dm.setup("fit")
    keys = keys_of(dm)
    assert len(keys) == len(set(keys))
    assert {f"s{s}-{i}" for s in range(3) for i in range(6)} <= set(keys)
    survivors = [k for k in keys if k.startswith("bad-")]
    assert 0 < len(survivors) < 6  # the intact samples before the cut are kept
    assert dm.skipped == 1 and dm.skipped_by_reason() == {"truncated": 1}  # counted across workers

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen = 0

        def training_step(self, batch, _):
            self.seen += batch["pixels"].shape[0]
            return (self.w - batch["pixels"].mean()).square()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SkippedSamplesLogger()],
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.seen == 2 * len(keys)  # two full epochs, each without the broken sample
    assert trainer.logged_metrics["data/skipped"] == 3  # one per pass, summed over passes


def test_undecodable_image_and_missing_caption_are_skipped_and_counted(tmp_path, caplog):
    with ShardWriter(tmp_path / "m-000000.tar") as w:
        w.write("good", {"png": png(noise_image(16, 16, 0)), "txt": b"fine"})
        w.write("corrupt", {"png": b"\x89PNG\r\n\x1a\nnot really a png", "txt": b"broken image"})
        w.write("half", {"png": png(noise_image(16, 16, 1))[:60], "txt": b"truncated image"})
        w.write("nocap", {"png": png(noise_image(16, 16, 2))})
        w.write("noimg", {"txt": b"caption only"})
    dm = ShardDataModule(str(tmp_path / "m-000000.tar"), batch_size=8, num_workers=0, resolution=16)
    dm.setup("fit")
    with caplog.at_level("WARNING"):
        assert keys_of(dm) == ["good"]
    assert dm.skipped == 4 and dm.skipped_by_reason() == {"image": 3, "caption": 1}
    assert "skipped sample (image)" in caplog.text and "corrupt: undecodable png" in caplog.text
    assert "skipped sample (caption)" in caplog.text and "nocap" in caplog.text


def test_everything_bad_is_a_clear_error(tmp_path):
    for s in range(2):
        with ShardWriter(tmp_path / f"b-{s:06d}.tar") as w:
            for i in range(3):
                w.write(f"b{s}-{i}", {"png": b"garbage", "txt": b"x"})
    (tmp_path / "b-000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    for workers, resampled in ((0, False), (2, False), (2, True)):
        dm = ShardDataModule(
            str(tmp_path / "b-*.tar"), num_workers=workers, resolution=16, resampled=resampled
        )
        dm.setup("fit")
        with pytest.raises(NoValidSamplesError, match="skipped"):
            keys_of(dm)
        assert dm.skipped >= 6


# ---- distributed and workers --------------------------------------------------------------------
def _rank_keys(tmp_path, monkeypatch, rank: int, epochs: int = 1, **kw) -> list[list[str]]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    dm = ShardDataModule(str(tmp_path / "s-{000000..000007}.tar"), batch_size=3, num_workers=2, **kw)
    dm.setup("fit")
    return [keys_of(dm) for _ in range(epochs)]


def test_two_ranks_two_workers_read_no_sample_twice(tmp_path, monkeypatch):
    write_shards(tmp_path, 8, 5, size=(8, 8))
    everything = {f"s{s}-{i}" for s in range(8) for i in range(5)}
    ranks = [_rank_keys(tmp_path, monkeypatch, r, epochs=2, resolution=8) for r in (0, 1)]
    for epoch in range(2):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(set(a)) and len(b) == len(set(b))  # no repeat within a rank
        assert not set(a) & set(b)  # nor across ranks
        assert set(a) | set(b) == everything  # and the epoch covers the dataset
    assert ranks[0][0] != ranks[0][1]  # a new order (and shard assignment) each epoch


def test_resampled_epoch_length_and_disjoint_shards(tmp_path, monkeypatch):
    write_shards(tmp_path, 8, 5, size=(8, 8))
    ranks = [
        _rank_keys(tmp_path, monkeypatch, r, resolution=8, resampled=True, samples_per_epoch=30)[0]
        for r in (0, 1)
    ]
    assert [len(k) for k in ranks] == [15, 15]  # samples_per_epoch split over the ranks
    shards = [{k.split("-")[0] for k in keys} for keys in ranks]
    assert not shards[0] & shards[1]  # each rank resamples only its own shards


def test_seeded_order_and_crops_are_reproducible(tmp_path):
    write_shards(tmp_path, 4, 6, size=(12, 20))

    def run(seed):
        dm = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=4, num_workers=2, resolution=12, seed=seed)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        return [k for b in batches for k in b["key"]], torch.cat([batch_ids(b) for b in batches])

    (k0, t0), (k1, t1), (k2, _) = run(0), run(0), run(1)
    assert k0 == k1 and torch.equal(t0, t1)
    assert k0 != k2


def test_sample_order_does_not_depend_on_where_the_shards_live(tmp_path):
    """Regression: the window permutation was drawn from the shard's full path, so the same data in
    another folder (a clean clone, another machine's mount) trained in another order."""
    import shutil

    write_shards(tmp_path / "a", 4, 12, size=(12, 12))
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")

    def keys(folder):
        dm = ShardDataModule(str(folder / "s-*.tar"), batch_size=4, num_workers=2, resolution=12, seed=3)
        dm.setup("fit")
        return [k for b in dm.train_dataloader() for k in b["key"]]

    here, there = keys(tmp_path / "a"), keys(tmp_path / "elsewhere" / "b")
    assert here == there and sorted(here) != here  # the same shuffled order


def test_data_configs_compose_and_instantiate(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    write_shards(tmp_path, 2, 2)
    conf = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "conf"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(conf, version_base="1.3"):
        for name in ("raw", "cached", "shapes", "shapes_cached"):
            cfg = compose("train", overrides=[f"data={name}", f"data.train_shards={tmp_path}/s-*.tar"])
            dm = instantiate(cfg.data)
            assert isinstance(dm, ShardDataModule) and dm.mode == ("cached" if "cached" in name else "raw")
            assert dm.seed == cfg.seed
    GlobalHydra.instance().clear()


def key_recorder(out):
    """A LightningModule that writes the keys each rank trained on to ``out/rank{r}.json``."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.keys = []

        def training_step(self, batch, _):
            self.keys += batch["key"]
            return (self.w - batch["pixels"].mean()).square()

        def on_train_end(self):
            (out / f"rank{self.global_rank}.json").write_text(json.dumps(self.keys))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Recorder()


def test_real_ddp_two_ranks_two_workers_disjoint(tmp_path):
    import lightning as L

    write_shards(tmp_path, 8, 5, size=(8, 8))
    dm = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=5, num_workers=2, resolution=8, drop_last=True)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(key_recorder(tmp_path), datamodule=dm)
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(a) == len(b) == 20  # 4 shards of 5 per rank, one whole batch per shard and worker
    assert len(set(a) | set(b)) == 40  # no sample read twice, across ranks and workers


def test_rank_and_world_from_trainer_then_environment(monkeypatch):
    from types import SimpleNamespace

    from tdd_lightning.data.ranks import rank_and_world

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert rank_and_world(None) == (2, 8)  # a launcher's environment, before any process group
    assert rank_and_world(SimpleNamespace(global_rank=3, world_size=4)) == (3, 4)  # the trainer wins
