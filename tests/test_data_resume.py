"""Exact mid-epoch resume on webdataset shards: kill -9, resume, and the per-step losses equal the straight
run, with 2 DataLoader workers, in cached, raw and resampled modes; 2 DDP ranks; another world size says
what it does; the skip-ahead reads headers only."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tdd_lightning.data.bench import write_synthetic_cache
from tdd_lightning.data.datamodule import ShardDataModule
from tdd_lightning.data.position import Position
from tests.test_data import write_shards
from tests.test_robustness import ROOT, losses, wait_for


def start(tiny_sdxl_dir, out, *extra):
    """``python train.py experiment=smoke`` on the tiny model in a subprocess (its output piped)."""
    args = [sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"model.pretrained={tiny_sdxl_dir}",
            "callbacks.sample_grid.prompts=[]", "trainer.log_every_n_steps=1", f"hydra.run.dir={out}",
            *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TDD_ROOT": str(out.parent), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def tiny_cache(tiny_sdxl_dir, folder: Path, samples=64, shards=8) -> str:
    unet = json.loads((Path(tiny_sdxl_dir) / "unet" / "config.json").read_text())
    te1, te2 = (
        json.loads((Path(tiny_sdxl_dir) / n / "config.json").read_text())
        for n in ("text_encoder", "text_encoder_2")
    )
    d, d2 = te1["hidden_size"] + te2["hidden_size"], te2["projection_dim"]
    shape = (unet["in_channels"], unet["sample_size"], unet["sample_size"])
    return write_synthetic_cache(folder, samples, shards, shape, (d - d2, d2))


MODES = {
    # one pass of 64 samples = 16 steps of 4: the resume at step 6 crosses the epoch end at 16
    "cached": ["data=cached", "data.resampled=false"],
    "resampled": ["data=cached", "data.resampled=true", "data.samples_per_epoch=40"],  # 10 steps an epoch
    "raw": ["data=raw", "data.resampled=false", "model.load_encoders=true", "data.resolution=64"],
}


def _run_args(tiny_sdxl_dir, tmp_path, mode):
    shards = tiny_cache(tiny_sdxl_dir, tmp_path / "cache") if mode != "raw" else None
    if mode == "raw":
        write_shards(tmp_path / "raw", 8, 8, size=(64, 80))  # random crops: the crop must resume too
        shards = str(tmp_path / "raw" / "s-*.tar")
    return [
        f"data.train_shards={shards}", "data.num_workers=2",
        "data.batch_size=4", "data.pin_memory=false", "data.shuffle_buffer=4", "data.shuffle_shards=2",
        "callbacks.lora_export=null", "callbacks.retention=null", *MODES[mode],
    ]  # fmt: skip


def kill_resume_straight(tiny_sdxl_dir, tmp_path, extra, stop=22, every=3, kill_after=6):
    killed = tmp_path / "killed"
    proc = start(tiny_sdxl_dir, killed, "trainer.max_steps=100000",
                 f"callbacks.model_checkpoint.every_n_train_steps={every}", *extra)  # fmt: skip
    wait_for(killed / "checkpoints" / f"step_{kill_after:07d}.ckpt", proc, timeout=240)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = killed / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < resumed_from < stop - 8
    resumed = tmp_path / "resumed"
    r = start(tiny_sdxl_dir, resumed, f"trainer.max_steps={stop}", f"ckpt_path={ckpt}", *extra)
    out = r.communicate(timeout=400)[0]
    assert r.returncode == 0, out[-3000:]
    full = tmp_path / "full"
    f = start(tiny_sdxl_dir, full, f"trainer.max_steps={stop}", *extra)
    assert f.wait(timeout=400) == 0, f.stdout.read()[-3000:]
    got, want = losses(resumed), losses(full)
    assert sorted(got) == list(range(resumed_from, stop))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-6, abs=1e-9), step
    return out


@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_cached_shards_exactly(tiny_sdxl_dir, tmp_path):
    kill_resume_straight(tiny_sdxl_dir, tmp_path, _run_args(tiny_sdxl_dir, tmp_path, "cached"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raw", "resampled"])
def test_kill_9_mid_epoch_resumes_raw_and_resampled_exactly(mode, tiny_sdxl_dir, tmp_path):
    kill_resume_straight(tiny_sdxl_dir, tmp_path, _run_args(tiny_sdxl_dir, tmp_path, mode))


# ---- the position as the loader sees it: every resume point, no training ----------------------------
def _stream(dm, steps):
    """``steps`` batches' keys across epochs, each pass from a new iter() of the same loader."""
    loader, out = dm.train_dataloader(), []
    while len(out) < steps:
        for batch in loader:
            dm.on_before_batch_transfer(batch, 0)
            out.append(batch["key"])
            if len(out) == steps:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_every_resume_point_continues_the_same_batches(tmp_path, workers, resampled):
    write_shards(tmp_path, 6, 7, size=(8, 8))  # 42 samples in shards of 7: uneven reader lengths
    kw = dict(batch_size=3, num_workers=workers, resolution=8, shuffle_buffer=3, shuffle_shards=2,
              resampled=resampled, samples_per_epoch=30 if resampled else None)  # fmt: skip

    def module():
        dm = ShardDataModule(str(tmp_path / "s-*.tar"), **kw)
        dm.setup("fit")
        return dm

    straight = _stream(module(), 30)
    assert len({k for b in straight[:13] for k in b}) == 39 or resampled  # one pass: no repeat
    for at in (1, 4, 7, 13, 14):
        first = module()
        assert _stream(first, at) == straight[:at]
        state = first.state_dict()
        again = module()
        again.load_state_dict(state)
        assert _stream(again, 30 - at) == straight[at:], at


def test_another_worker_count_says_what_it_does(tmp_path, capsys):
    write_shards(tmp_path, 4, 4, size=(8, 8))
    dm = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=2, num_workers=2, resolution=8)
    dm.setup("fit")
    _stream(dm, 3)
    other = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=2, num_workers=1, resolution=8)
    other.setup("fit")
    other.load_state_dict(dm.state_dict())
    other.train_dataloader()
    said = capsys.readouterr().out
    assert "1 rank(s) x 2 worker(s), this run 1 x 1" in said and "starts epoch 1 afresh" in said
    assert other._loader.next_epoch == 1


def test_skip_ahead_reads_headers_not_samples(tmp_path, monkeypatch):
    """A resume deep into a shard opens it at the sample by a header walk: no sample before it is read."""
    import tdd_lightning.data.shards as shards_mod
    from tdd_lightning.data.shards import iter_tar_samples

    path = write_shards(tmp_path, 1, 50, size=(8, 8))[0]
    reads = []
    real = shards_mod.tarfile.TarFile.extractfile
    monkeypatch.setattr(
        shards_mod.tarfile.TarFile, "extractfile", lambda self, m: reads.append(m.name) or real(self, m)
    )
    got = [s["__key__"] for s in iter_tar_samples(path, lambda *a: None, skip=45)]
    assert got == [f"s0-{i}" for i in range(45, 50)]
    assert len(reads) == 10  # the 5 samples' png and txt only
    assert Position.from_dict(Position(1, 2, 3, [1], [False]).to_dict()) == Position(1, 2, 3, [1], [False])


# ---- 2 DDP ranks: the checkpoint holds both ranks' places ------------------------------------------
class KeyLoss(L.LightningModule):
    """A loss that is a function of the batch's samples; records (step, keys, loss) per rank."""

    def __init__(self, out: Path):
        super().__init__()
        self.w, self.out, self.rows = torch.nn.Parameter(torch.zeros(())), out, []

    def training_step(self, batch, _):
        loss = (self.w - batch["latents"].mean()).square()
        self.rows.append([self.global_step, batch["key"], float(loss)])
        return loss

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.json").write_text(json.dumps(self.rows))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _ddp_fit(shards, out: Path, max_steps: int, ckpt=None, every=None):
    out.mkdir(parents=True, exist_ok=True)
    dm = ShardDataModule(shards, mode="cached", batch_size=2, num_workers=2, shuffle_buffer=3,
                         shuffle_shards=2, resampled=False)  # fmt: skip
    callbacks = []
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(out, every_n_train_steps=every, save_top_k=-1))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_checkpointing=bool(every), callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(KeyLoss(out), datamodule=dm, ckpt_path=ckpt)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_ranks_resume_equals_the_straight_run(tiny_sdxl_dir, tmp_path):
    shards = tiny_cache(tiny_sdxl_dir, tmp_path / "cache", samples=96, shards=8)  # 12 steps an epoch
    straight = _ddp_fit(shards, tmp_path / "straight", 20, every=5)
    ckpts = sorted((tmp_path / "straight").glob("*step=5*.ckpt"))
    assert ckpts, list((tmp_path / "straight").iterdir())
    resumed = _ddp_fit(shards, tmp_path / "resumed", 20, ckpt=str(ckpts[0]))
    for r in (0, 1):
        assert [row[0] for row in resumed[r]] == list(range(5, 20))
        assert [row[1] for row in resumed[r]] == [row[1] for row in straight[r][5:]]  # the same samples
        for a, b in zip(resumed[r], straight[r][5:], strict=True):
            assert a[2] == pytest.approx(b[2], rel=1e-6, abs=1e-9)
    assert not {k for row in straight[0][:12] for k in row[1]} & {
        k for row in straight[1][:12] for k in row[1]
    }


def test_persistent_workers_read_the_same_epochs(tmp_path):
    write_shards(tmp_path, 4, 5, size=(8, 8))

    def epochs(persistent):
        dm = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=2, num_workers=2, resolution=8,
                             persistent_workers=persistent)  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [[k for b in loader for k in b["key"]] for _ in range(3)]

    plain = epochs(False)
    assert plain[0] != plain[1] and sorted(plain[0]) == sorted(plain[1])
    assert epochs(True) == plain  # a persistent worker moves on to the next epoch by itself


def test_a_checkpoint_without_a_data_position_says_so(tmp_path, capsys):
    from types import SimpleNamespace

    write_shards(tmp_path, 2, 2, size=(8, 8))
    dm = ShardDataModule(str(tmp_path / "s-*.tar"), batch_size=2, num_workers=0, resolution=8)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, ckpt_path="old.ckpt")
    dm.setup("fit")
    dm.train_dataloader()
    assert "the checkpoint old.ckpt holds none" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_skip_ahead_in_every_tar_format(tmp_path, fmt):
    """The fast header walk (plain ustar/gnu) and tarfile's (long names, pax) land on the same sample."""
    import io
    import tarfile

    from tdd_lightning.data.shards import iter_tar_samples

    path = tmp_path / "x.tar"
    deep = "d" * 60 + "/" + "e" * 50  # a name over 100 characters: a prefix (ustar), a long name (gnu, pax)
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tar:
        for i in range(6):
            for ext in ("txt", "cls"):
                info = tarfile.TarInfo(f"{deep}/k{i}.{ext}")
                info.size = 2
                tar.addfile(info, io.BytesIO(b"%02d" % i))
    got = list(iter_tar_samples(str(path), lambda *a: None, skip=4))
    assert [s["__key__"] for s in got] == [f"{deep}/k4", f"{deep}/k5"] and got[0]["txt"] == b"04"
