"""train.py end to end: the SDXL recipe fails fast offline, sweeps, resume, wandb offline."""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdd_lightning.training import sweep_report
from tdd_lightning.training.run import train
from tests.hydra_utils import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def run_train(args, tmp_path, timeout=300):
    env = {**ENV, "TDD_ROOT": str(tmp_path)}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("experiment", ["sdxl_tdd", "sd15_tdd", "flux_tdd"])
def test_hub_recipes_fail_fast_offline_with_one_line(experiment, tmp_path):
    start = time.monotonic()
    r = run_train([f"experiment={experiment}"], tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode != 0 and elapsed < 30
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.pretrained" in errors[0] and "local" in errors[0]
    assert "Traceback" not in r.stderr


def test_multirun_sweep_and_report(tiny_sdxl_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = run_train(
        ["-m", "experiment=smoke", "target_selection.s_ratio=0.0,0.3", "guidance.p_empty=0.0,0.2",
         f"model.pretrained={tiny_sdxl_dir}", "trainer.max_steps=3", "callbacks.sample_grid.prompts=[]",
         f"hydra.sweep.dir={sweep_dir}"],
        tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 4 and len(set(jobs)) == 4
    assert jobs[0].startswith("0_guidance.p_empty=0.0,target_selection.s_ratio=0.0")
    assert jobs[3].startswith("3_guidance.p_empty=0.2,target_selection.s_ratio=0.3")
    rows = sweep_report.collect(sweep_dir)
    assert len(rows) == 4 and all(r["metrics"]["global_step"] == 3 for r in rows)
    table = sweep_report.to_markdown(rows)
    assert table.count("\n") == 5 and "target_selection.s_ratio" in table and "guidance.p_empty" in table
    assert sweep_report.main([str(sweep_dir)]) == 0 and (sweep_dir / "report.md").exists()


def _losses(out_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((out_dir / "csv" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_resume_from_checkpoint_continues_the_run(tiny_sdxl_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    common = [
        "experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "callbacks.sample_grid.prompts=[]",
        "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=3",
        "data.num_samples=64", "data.batch_size=4",
    ]  # fmt: skip
    train(compose_cfg([*common, "trainer.max_steps=6"], tmp_path / "full"))
    train(compose_cfg([*common, "trainer.max_steps=3"], tmp_path / "part"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    metrics = train(compose_cfg([*common, "trainer.max_steps=6", f"ckpt_path={ckpt}"], tmp_path / "resumed"))
    assert metrics["global_step"] == 6
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4, 5]  # steps after the checkpoint only
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7), step


def test_wandb_offline_logs_scalars_histograms_and_grid(tiny_sdxl_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    cfg = compose_cfg(
        ["experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "logger=wandb", "trainer.max_steps=4",
         "trainer.log_every_n_steps=1", "callbacks.time_histograms.every_n_steps=2",
         "callbacks.sample_grid.every_n_steps=2", "data.batch_size=4"],
        tmp_path / "out",
    )  # fmt: skip
    train(cfg)
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("files/media/images/samples/*.png"))
    assert list(runs[0].glob("*.wandb"))
