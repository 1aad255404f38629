"""Bad data is skipped and counted, never trained on silently; the cache never overwrites its inputs.

Image modes against hand-made pixels, NaN/Inf and wrongly shaped cached samples, caption problems,
empty-caption policy, missing shards named at start-up, the encoder's output folder checks and staging,
and DataLoader workers that leave the job's signals to the main process.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdd_lightning.data.datamodule import ShardDataModule, SkippedSamplesLogger
from tdd_lightning.data.encode import _sample_bytes
from tdd_lightning.data.encode import main as encode_main
from tdd_lightning.data.preprocess import SDXLPreprocess, to_rgb
from tdd_lightning.data.resumable import ResumableLoader
from tdd_lightning.data.shards import ShardWriter
from tdd_lightning.errors import ConfigError, UserError
from tests.hydra_utils import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def reopened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def rgb_of(image: Image.Image) -> list:
    return np.asarray(to_rgb(image)).tolist()


def pixels_of(image: Image.Image) -> np.ndarray:
    """What training sees, back in uint8: SDXLPreprocess at the image's own size (no resize, no crop)."""
    pixels = SDXLPreprocess((image.height, image.width), center_crop=True)(image)["pixels"]
    return ((pixels + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


# ---- image modes (16-bit, palette, grey, alpha, CMYK, 1-bit) --------------------------------------
SIXTEEN = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
SIXTEEN_AS_8 = [0, 4, 128, 255]  # round(v * 255 / 65535)


def test_sixteen_bit_greyscale_is_scaled_not_white():
    as_png = reopened(png_bytes(Image.fromarray(SIXTEEN)))  # a 16-bit greyscale PNG
    big_endian = Image.frombytes("I;16B", (4, 1), SIXTEEN.astype(">u2").tobytes())
    as_int32 = Image.fromarray(SIXTEEN.astype(np.int32))
    for image, mode in ((as_png, "I;16"), (big_endian, "I;16B"), (as_int32, "I")):
        assert image.mode == mode
        assert rgb_of(image) == [[[v] * 3 for v in SIXTEEN_AS_8]], mode
        assert pixels_of(image)[0, :, 0].tolist() == SIXTEEN_AS_8, mode


def test_alpha_is_composited_on_the_documented_white_background():
    rgba = Image.fromarray(np.array([[[200, 10, 20, 255], [200, 10, 20, 0], [0, 0, 0, 0]]], dtype=np.uint8))
    assert rgb_of(rgba) == [[[200, 10, 20], list(WHITE), list(WHITE)]]
    half = Image.fromarray(np.array([[[0, 0, 0, 128]]], dtype=np.uint8))  # black at half opacity: grey
    assert abs(rgb_of(half)[0][0][0] - 127) <= 1
    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], dtype=np.uint8), "LA")
    assert rgb_of(la) == [[[40] * 3, list(WHITE)]]
    assert pixels_of(rgba)[0].tolist() == [[200, 10, 20], list(WHITE), list(WHITE)]


def test_palette_images_with_and_without_transparency():
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0] + [0] * (768 - 9))
    p.putdata([0, 1, 2])
    assert rgb_of(p) == [[[255, 0, 0], [0, 0, 255], [0, 128, 0]]]
    keyed = reopened(png_bytes(p, transparency=1))  # palette index 1 transparent (tRNS)
    assert keyed.mode == "P" and rgb_of(keyed) == [[[255, 0, 0], list(WHITE), [0, 128, 0]]]
    pa = p.convert("PA")
    pa.putalpha(Image.fromarray(np.array([[255, 0, 255]], dtype=np.uint8)))
    assert pa.mode == "PA" and rgb_of(pa) == [[[255, 0, 0], list(WHITE), [0, 128, 0]]]


def test_grey_cmyk_and_one_bit_keep_their_values():
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert rgb_of(grey) == [[[0] * 3, [77] * 3, [255] * 3]]
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    assert rgb_of(cmyk) == [[list(WHITE), [0, 255, 255], list(BLACK)]]
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert rgb_of(one) == [[list(BLACK), list(WHITE)]]
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb  # valid RGB data is untouched


def test_sixteen_bit_png_through_a_shard_trains_on_its_real_values(tmp_path):
    ramp = np.tile((np.arange(16, dtype=np.uint32) * 4369).astype(np.uint16), (16, 1))  # 0 .. 65535
    with ShardWriter(tmp_path / "g-000000.tar") as w:
        w.write("grey16", {"png": png_bytes(Image.fromarray(ramp)), "txt": b"a grey ramp"})
    dm = ShardDataModule(str(tmp_path / "g-000000.tar"), batch_size=1, num_workers=0, resolution=16)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    row = ((batch["pixels"][0, 0, 0] + 1) * 127.5).round().int().tolist()
    assert row == [round(v * 255 / 65535) for v in ramp[0].tolist()]  # 0, 17, 34, ..., 255: not white


# ---- cached samples: NaN/Inf, shapes; captions ------------------------------------------------------
LATENT, TEXT, POOLED = (4, 2, 2), (77, 8), (6,)


def cached_blob(seed: int, latent=LATENT, text=TEXT, pooled=POOLED, poison: str | None = None) -> bytes:
    g = torch.Generator().manual_seed(seed)
    t = {
        "latents": torch.randn(latent, generator=g).half(),
        "prompt_embeds": torch.randn(text, generator=g).half(),
        "pooled_prompt_embeds": torch.randn(pooled, generator=g).half(),
        "time_ids": torch.tensor([16.0, 16, 0, 0, 16, 16]),
    }
    if poison:
        key, value = poison.split("=")
        t[key].view(-1)[1] = float(value)
    return _sample_bytes(t)


def write_cache(folder: Path, samples: dict[str, tuple[bytes, bytes]], meta: bool = True) -> str:
    """One cached shard of ``samples`` (key -> (safetensors blob, caption bytes)), uncond, meta.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder / "c-000000.tar") as w:
        for key, (blob, caption) in samples.items():
            w.write(key, {"safetensors": blob, "txt": caption})
    save_file({"prompt_embeds": torch.zeros(TEXT), "pooled_prompt_embeds": torch.zeros(POOLED)},
              str(folder / "uncond.safetensors"))  # fmt: skip
    if meta:
        (folder / "meta.json").write_text(json.dumps({"latent_shape": list(LATENT)}))
    return str(folder / "c-*.tar")


BAD_CACHED = {
    "nan_latents": (cached_blob(1, poison="latents=nan"), b"x"),
    "inf_text": (cached_blob(2, poison="prompt_embeds=inf"), b"x"),
    "ninf_pooled": (cached_blob(3, poison="pooled_prompt_embeds=-inf"), b"x"),
    "small_latents": (cached_blob(4, latent=(4, 1, 1)), b"x"),
    "wide_text": (cached_blob(5, text=(77, 9)), b"x"),
    "latin1": (cached_blob(6), "caf\xe9".encode("latin-1")),
    "empty": (cached_blob(7), b"  "),
}


@pytest.mark.parametrize("workers", [0, 2])
def test_nonfinite_and_misshapen_cached_samples_are_skipped_by_reason(tmp_path, workers):
    good = {f"good{i}": (cached_blob(10 + i), f"caption {i}".encode()) for i in range(3)}
    # two shards, so that each worker reads one (the bad samples first in the first shard)
    spec = write_cache(tmp_path, {**BAD_CACHED, "good0": good["good0"]})
    with ShardWriter(tmp_path / "c-000001.tar") as w:
        for key in ("good1", "good2"):
            w.write(key, {"safetensors": good[key][0], "txt": good[key][1]})
    dm = ShardDataModule(spec, mode="cached", batch_size=4, num_workers=workers, shuffle_buffer=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())  # before: a NaN batch, or a collate error on the shapes
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == ["empty", "good0", "good1", "good2"]  # empty captions are kept by default
    assert all(torch.isfinite(b[k]).all() for b in batches for k in ("latents", "prompt_embeds"))
    assert dm.skipped_by_reason() == {"nonfinite": 3, "shape": 2, "caption": 1}
    assert dm.empty_captions_kept == 1


def test_empty_captions_skip_is_counted_and_the_policy_is_checked(tmp_path):
    spec = write_cache(tmp_path, {"good": (cached_blob(0), b"fine"), "empty": BAD_CACHED["empty"]})
    dm = ShardDataModule(spec, mode="cached", batch_size=4, num_workers=0, empty_captions="skip")
    dm.setup("fit")
    assert [k for b in dm.train_dataloader() for k in b["key"]] == ["good"]
    assert dm.skipped_by_reason() == {"empty_caption": 1} and dm.empty_captions_kept == 0
    with pytest.raises(ConfigError, match="^empty_captions='drop' is invalid: must be one of keep, skip"):
        ShardDataModule(spec, mode="cached", empty_captions="drop")


def test_without_meta_json_the_first_sample_fixes_the_latent_shape(tmp_path):
    samples = {"a": (cached_blob(0), b"a"), "b": (cached_blob(1, latent=(4, 3, 3)), b"b")}
    spec = write_cache(tmp_path, samples, meta=False)
    dm = ShardDataModule(spec, mode="cached", num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    assert [k for b in dm.train_dataloader() for k in b["key"]] == ["a"]
    assert dm.skipped_by_reason() == {"shape": 1}


def test_raw_caption_problems_are_caption_problems(tmp_path):
    img = png_bytes(Image.new("RGB", (8, 8), (9, 9, 9)))
    with ShardWriter(tmp_path / "r-000000.tar") as w:
        w.write("ok", {"png": img, "txt": b"fine"})
        w.write("latin1", {"png": img, "txt": "na\xefve".encode("latin-1")})  # not UTF-8
        w.write("badjson", {"png": img, "json": b"{not json"})
        w.write("blank", {"png": img, "txt": b""})
    dm = ShardDataModule(str(tmp_path / "r-000000.tar"), batch_size=8, num_workers=0, resolution=8)
    dm.setup("fit")
    assert sorted(k for b in dm.train_dataloader() for k in b["key"]) == ["blank", "ok"]
    assert dm.skipped_by_reason() == {"caption": 2}  # before: counted as image problems
    assert dm.empty_captions_kept == 1


def test_skipped_samples_logger_logs_every_reason(tmp_path):
    import lightning as L

    spec = write_cache(tmp_path, {**BAD_CACHED, "good": (cached_blob(0), b"fine")})

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, _):
            return (self.w - batch["latents"].mean()).square()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ShardDataModule(spec, mode="cached", batch_size=2, num_workers=0, shuffle_buffer=0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SkippedSamplesLogger()])  # fmt: skip
    trainer.fit(Probe(), datamodule=dm)
    got = {k: v.item() for k, v in trainer.logged_metrics.items() if k.startswith("data/")}
    assert got["data/skipped"] == 6 and got["data/skipped_nonfinite"] == 3
    assert got["data/skipped_shape"] == 2 and got["data/skipped_caption"] == 1
    assert got["data/skipped_image"] == 0 and got["data/empty_captions_kept"] == 1


# ---- missing shards: one line naming the key, at start-up -----------------------------------------
def test_empty_glob_and_missing_shard_name_the_key(tmp_path, tiny_sdxl_dir):
    from tdd_lightning.training.building import build

    cfg = compose_cfg(["data=raw", f"data.train_shards={tmp_path}/nope/*.tar"], tmp_path)
    with pytest.raises(
        UserError, match=r"^data\.train_shards='.*/nope/\*\.tar' is invalid: no shard matches"
    ):
        build("data", cfg.data)
    cfg = compose_cfg(["data=cached", f"data.train_shards=[{tmp_path}/a.tar]"], tmp_path)
    with pytest.raises(UserError, match=r"^data\.train_shards=.* is invalid: shard not found: .*/a\.tar$"):
        build("data", cfg.data)

    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data=raw", "data.train_shards=/nope/*.tar",
         f"model.pretrained={tiny_sdxl_dir}", "trainer=cpu", "logger=none", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "TDD_ROOT": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data.train_shards='/nope/*.tar' is invalid")
    assert "Traceback" not in r.stderr


# ---- the offline encoder's output folder ------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("encode") / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for s in range(2):
        with ShardWriter(raw / f"s-{s:06d}.tar") as w:
            for i in range(3):
                img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                w.write(f"s{s}-{i}", {"png": png_bytes(img), "txt": f"caption {s} {i}".encode()})
    return raw


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def encode(raw: Path, out, model: Path, *extra) -> dict:
    args = [str(raw / "s-*.tar"), str(out), "--model", str(model), "--resolution", "32", "--no-progress"]
    return encode_main([*args, "--num-workers", "0", *extra])


def test_encode_refuses_an_output_that_overlaps_its_input(raw_dir, tiny_sdxl_dir, tmp_path):
    before = snapshot(raw_dir)
    link = tmp_path / "link"
    link.symlink_to(raw_dir)
    cases = [
        (raw_dir, "is the input folder"),
        (raw_dir / "cache", "is inside the input folder"),
        (raw_dir.parent, "contains the input folder"),
        (link, "is the input folder"),  # a symlink to the input folder
    ]
    for out, message in cases:
        with pytest.raises(UserError, match=message):
            encode(raw_dir, out, tiny_sdxl_dir, "--overwrite")
        assert snapshot(raw_dir) == before, out  # before: 6 raw samples became a cache of them
    assert not (raw_dir / "cache").exists()

    r = subprocess.run(
        [sys.executable, "-m", "tdd_lightning.data.encode", str(raw_dir / "s-*.tar"), str(raw_dir),
         "--model", str(tiny_sdxl_dir), "--overwrite"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    assert snapshot(raw_dir) == before


class FailingEncoder:
    """An encoder that fails at its second batch (a crash part-way through a cache)."""

    def __init__(self, encoder):
        self.inner, self.calls = encoder, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("disk full")
        return self.inner(*args, **kwargs)


def test_encode_stages_the_cache_and_replaces_only_a_cache(raw_dir, tiny_components, tiny_sdxl_dir, tmp_path):
    from tdd_lightning.data.encode import encode_shards
    from tdd_lightning.models.families.sdxl import SDXLEncoder

    out = tmp_path / "cache"
    meta = encode(raw_dir, out, tiny_sdxl_dir)
    assert meta["samples"] == 6 and meta["empty_captions_kept"] == 0
    good = snapshot(out)
    assert sorted(good) == ["meta.json", "s-000000.tar", "s-000001.tar", "uncond.safetensors"]
    with tarfile.open(out / "s-000000.tar") as tar:
        assert len(tar.getnames()) == 6  # 3 samples x (safetensors, txt)

    with pytest.raises(FileExistsError, match="overwrite"):
        encode(raw_dir, out, tiny_sdxl_dir)  # an existing cache needs --overwrite

    # a crash part-way through an --overwrite: the previous cache is untouched, no partial folder left
    leftover = tmp_path / ".cache.partial-999999999"  # what a kill -9 leaves (a pid that cannot run)
    leftover.mkdir()
    failing = FailingEncoder(SDXLEncoder.from_components(tiny_components))
    with pytest.raises(RuntimeError, match="disk full"):
        encode_shards(str(raw_dir / "s-*.tar"), out, failing, resolution=32, batch_size=2, num_workers=0,
                      overwrite=True, progress=False)  # fmt: skip
    assert snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the kill -9 leftover is gone too

    # a folder that is not a cache (no meta.json, a user's file) is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a cache written by"):
        encode(raw_dir, mine, tiny_sdxl_dir, "--overwrite")
    assert (mine / "notes.txt").read_text() == "keep me"

    # --overwrite replaces a cache as a whole (here: a stale extra shard disappears)
    (out / "s-000009.tar").write_bytes(good["s-000000.tar"])
    encode(raw_dir, out, tiny_sdxl_dir, "--overwrite")
    assert sorted(snapshot(out)) == sorted(good)
    assert {k: v for k, v in snapshot(out).items() if k != "meta.json"} == {
        k: v for k, v in good.items() if k != "meta.json"
    }  # same inputs, same bytes


def test_a_cache_moved_aside_by_a_killed_run_is_put_back(raw_dir, tmp_path):
    from tdd_lightning.data.cache_folder import check_output_folder

    aside = tmp_path / ".cache.old-999999999"  # killed between publish()'s two renames (pid cannot run)
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite"):  # it is back, and protected as a cache
        check_output_folder([str(raw_dir / "s-000000.tar")], tmp_path / "cache", overwrite=False)
    assert (tmp_path / "cache" / "meta.json").read_text() == "{}" and not aside.exists()


# ---- DataLoader workers and the job's signals -------------------------------------------------------
class WorkerProbe(torch.utils.data.Dataset):
    """Each item: the worker's handlers for SIGTERM, SIGUSR1, SIGINT and one torch draw."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        handlers = [
            int(signal.getsignal(s) == signal.SIG_IGN)
            for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        ]
        return {"ignored": torch.tensor(handlers), "draw": torch.rand(1)}


def test_workers_ignore_the_job_signals_and_keep_lightnings_seeds(monkeypatch):
    from functools import partial

    from lightning.fabric.utilities.seed import pl_worker_init_function

    monkeypatch.setenv("PL_SEED_WORKERS", "1")  # as after seed_everything(workers=True)
    # default handlers in this process first: a test run started in the background (`cmd &`) inherits
    # SIGINT ignored, which the plain loader's workers would then inherit too
    job_signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    saved = {s: signal.signal(s, signal.SIG_DFL) for s in job_signals}
    try:
        torch.manual_seed(0)
        ours = list(ResumableLoader(WorkerProbe(8), 2, num_workers=1, rank=1, world_size=2))  # 2 batches
        torch.manual_seed(0)
        init = partial(pl_worker_init_function, rank=1)
        plain = torch.utils.data.DataLoader(WorkerProbe(4), 2, num_workers=1, worker_init_fn=init)
        lightning = list(plain)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert all(b["ignored"].all() for b in ours)
    assert not any(b["ignored"].any() for b in lightning)
    # the same worker random streams as Lightning's own worker_init_fn (what the loader replaces)
    assert [b["draw"].tolist() for b in ours] == [b["draw"].tolist() for b in lightning]


class WithPid:
    """A decoder wrapper that adds the worker's pid to each sample."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, sample: dict, rng) -> dict:
        return {**self.inner(sample, rng), "pid": torch.tensor(os.getpid())}


class PidItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        return {"i": torch.tensor(i), "pid": torch.tensor(os.getpid())}


def shard_loader(folder: Path):
    with ShardWriter(folder / "w-000000.tar") as w0, ShardWriter(folder / "w-000001.tar") as w1:
        for i in range(16):
            (w0 if i % 2 else w1).write(f"k{i}", {"png": png_bytes(Image.new("RGB", (8, 8))), "txt": b"x"})
    dm = ShardDataModule(str(folder / "w-*.tar"), batch_size=2, num_workers=2, resolution=8)
    dm.setup("fit")
    source = dm.train_dataset.sources[0]
    source.decoder = WithPid(source.decoder)
    return dm.train_dataloader()


@pytest.mark.parametrize("kind", ["synthetic", "shards"])
def test_signalled_workers_keep_serving_batches(kind, tmp_path):
    """SIGTERM, SIGUSR1 and SIGINT sent to each worker mid-epoch: every batch still arrives (before: the
    worker died and the loader raised RuntimeError "DataLoader worker ... exited unexpectedly")."""
    loader = ResumableLoader(PidItems(), 2, num_workers=2) if kind == "synthetic" else shard_loader(tmp_path)
    it = iter(loader)
    batches = [next(it), next(it)]  # one from each worker
    pids = {int(p) for b in batches for p in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(pid, sig)
    batches += list(it)
    assert sum(len(b["pid"]) for b in batches) == (32 if kind == "synthetic" else 16)  # every sample
    assert {int(p) for b in batches for p in b["pid"]} == pids


# ---- the synthetic loader's resume: one stream of batches, however Lightning cuts it ------------
class Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> int:
        return i


def as_lightning_takes(loader: ResumableLoader, steps: int) -> list[list[int]]:
    """Batches as Lightning takes them: ``len()`` (read once, after any load) per ``iter()``, stopping
    there without exhausting the iterator; an ``iter()`` that runs dry ends its epoch early."""
    per_epoch, out = len(loader), []
    while len(out) < steps:
        it = iter(loader)
        for _ in range(min(per_epoch, steps - len(out))):
            batch = next(it, None)
            if batch is None:
                break
            out.append(batch.tolist())
    return out


@pytest.mark.parametrize("resume_at", [8, 4, 12], ids=["epoch_end", "mid_epoch", "mid_second_epoch"])
def test_resumable_loader_resumes_the_same_stream(resume_at):
    straight = as_lightning_takes(ResumableLoader(Indices(), 4, seed=3), 40)  # 8 batches per epoch
    epochs = [sorted(sum(straight[e * 8 : (e + 1) * 8], [])) for e in range(5)]
    assert all(e == list(range(32)) for e in epochs)  # each epoch visits every sample once
    assert straight[:8] != straight[8:16]  # in a new order each epoch (before: the same one)

    first = ResumableLoader(Indices(), 4, seed=3)
    assert as_lightning_takes(first, resume_at) == straight[:resume_at]
    resumed = ResumableLoader(Indices(), 4, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) > 0  # before: 0 at an epoch end ("No training batches")
    assert as_lightning_takes(resumed, 40 - resume_at) == straight[resume_at:]  # 28+ batches
