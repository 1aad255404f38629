"""Crash safety: non-finite guard, start-up validation, atomic and truncated checkpoints,
preemption by signal, exact resume after kill -9, and the SLURM launcher config."""

import csv
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tdd_lightning.checkpoint_io import AtomicCheckpointIO, atomic_write
from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.errors import UserError
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection
from tdd_lightning.training.run import check_config, train
from tests.hydra_utils import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


class NaNAtSteps(PseudoHuberLoss):
    """A loss that is NaN at chosen global steps (read from the module that owns it)."""

    def __init__(self, steps, module_ref):
        super().__init__()
        self.steps, self.module_ref = set(steps), module_ref

    def __call__(self, pred, target):
        loss = super().__call__(pred, target)
        return loss * float("nan") if self.module_ref[0].global_step in self.steps else loss


def nan_module(tiny_sdxl_dir, steps, max_nonfinite_steps=10):
    ref = []
    m = TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": 4}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(),
        loss=NaNAtSteps(steps, ref),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        ema_decay=0.5,
        max_nonfinite_steps=max_nonfinite_steps,
    )
    ref.append(m)
    return m


class Snapshots(L.Callback):
    def __init__(self):
        self.student, self.target = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.student.append([p.detach().clone() for p in pl_module.roles.student_params])
        self.target.append([p.detach().clone() for p in pl_module.roles.target_params])


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_nonfinite_steps_are_skipped_and_counted(tiny_sdxl_dir, tmp_path):
    m, snaps = nan_module(tiny_sdxl_dir, steps={2}), Snapshots()
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=16, batch_size=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[snaps], default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(m, datamodule=dm)
    # step index 2 (the third batch) had a NaN loss: neither the student nor the EMA target moved
    assert same(snaps.student[2], snaps.student[1]) and same(snaps.target[2], snaps.target[1])
    assert not same(snaps.student[3], snaps.student[2]) and not same(snaps.student[1], snaps.student[0])
    assert all(torch.isfinite(p).all() for p in m.roles.student_params)
    assert m.nonfinite_total == 1 and m.nonfinite_in_a_row == 0
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tiny_sdxl_dir, tmp_path):
    m = nan_module(tiny_sdxl_dir, steps={1, 2, 3, 4}, max_nonfinite_steps=3)
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=16, batch_size=2)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(RuntimeError, match="3 training steps in a row had a non-finite") as e:
        trainer.fit(m, datamodule=dm)
    good = Path(str(e.value).split("is in ")[1].split(":")[0])
    assert good.name == "last_good.ckpt" and good.exists()
    state = torch.load(good, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("model.lora.rank=0", "model.lora.rank"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("module.ema_decay=2", "module.ema_decay"),
        ("module.max_nonfinite_steps=0", "module.max_nonfinite_steps"),
        ("model.base_dtype=fp8", "model.base_dtype"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ],
)
def test_validation_names_key_and_range(override, key, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(UserError, match="^" + re.escape(key) + "=.* is invalid: must be "):
        check_config(cfg)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.ckpt"
    AtomicCheckpointIO().save_checkpoint({"a": torch.ones(3)}, target)
    assert torch.load(target)["a"].sum() == 3

    def broken(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert torch.load(target)["a"].sum() == 3  # previous checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.ckpt"]  # no temp file left


def test_truncated_checkpoint_gives_a_clear_error(tiny_sdxl_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    common = ["experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "callbacks.sample_grid.prompts=[]"]
    train(compose_cfg([*common, "trainer.max_steps=2"], tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(UserError, match=r"ckpt_path: checkpoint .*broken.ckpt cannot be read \(truncated"):
        train(compose_cfg([*common, f"ckpt_path={broken}"], tmp_path / "b"))
    with pytest.raises(UserError, match="does not exist"):
        train(compose_cfg([*common, f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path / "c"))


# ---- subprocess runs: signals and kill -9 -------------------------------------------------------------


def start(tiny_sdxl_dir, out, *extra, **popen):
    args = [
        sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"model.pretrained={tiny_sdxl_dir}",
        "callbacks.sample_grid.prompts=[]", "trainer.log_every_n_steps=1", "data.batch_size=4",
        "data.num_samples=64", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TDD_ROOT": str(out.parent), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def wait_for(path: Path, proc, timeout=120):
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def losses(out: Path) -> dict[int, float]:
    rows = csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_and_exits_cleanly(sig, tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(
        tiny_sdxl_dir, out, "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=2"
    )
    wait_for(out / "checkpoints" / "step_0000002.ckpt", proc)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "preempted" in output and "checkpoint saved to" in output
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert 2 <= ckpt["global_step"] < 100000


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_whole_process_group_with_two_workers(sig, tiny_sdxl_dir, tmp_path):
    """SLURM signals every process of the step: the workers must leave it to the main process."""
    out = tmp_path / "run"
    proc = start(
        tiny_sdxl_dir, out, "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=2",
        "data.num_workers=2", start_new_session=True,
    )  # fmt: skip
    wait_for(out / "checkpoints" / "step_0000002.ckpt", proc)
    os.killpg(proc.pid, sig)  # the main process and its two DataLoader workers
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[
        -3000:
    ]  # before: RuntimeError: DataLoader worker ... killed by signal
    assert "preempted" in output and "checkpoint saved to" in output and "Traceback" not in output
    end = time.monotonic() + 30
    while group_alive(proc.pid):  # no worker left behind
        assert time.monotonic() < end, "a process of the run outlived it"
        time.sleep(0.2)
    last = out / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert step >= 2
    os.environ["TDD_ROOT"] = str(tmp_path)
    common = ["experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "callbacks.sample_grid.prompts=[]",
              "data.batch_size=4", "data.num_samples=64", "data.num_workers=2"]  # fmt: skip
    metrics = train(
        compose_cfg([*common, f"trainer.max_steps={step + 2}", f"ckpt_path={last}"], tmp_path / "b")
    )
    assert metrics["global_step"] == step + 2  # resumable


def test_synthetic_resume_matches_the_straight_run_for_20_steps(tiny_sdxl_dir, tmp_path):
    """Resumed at an epoch end (step 8 of 8 per epoch) and mid-epoch (step 4): 22 and 26 steps, loss by
    loss, across three epoch boundaries. Before: the epoch-end checkpoint trained nothing ("No training
    batches", exit 0) and the mid-epoch one drifted from its first epoch boundary on."""
    os.environ["TDD_ROOT"] = str(tmp_path)
    common = [
        "experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "callbacks.sample_grid.prompts=[]",
        "callbacks.lora_export=null", "callbacks.retention=null", "trainer.log_every_n_steps=1",
        "data.num_samples=32", "data.batch_size=4", "callbacks.model_checkpoint.every_n_train_steps=4",
        "trainer.max_steps=30",
    ]  # fmt: skip
    train(compose_cfg(common, tmp_path / "full"))
    full = losses(tmp_path / "full")
    assert sorted(full) == list(range(30))
    for at in (8, 4):
        ckpt = tmp_path / "full" / "checkpoints" / f"step_{at:07d}.ckpt"
        metrics = train(compose_cfg([*common, f"ckpt_path={ckpt}"], tmp_path / f"from{at}"))
        assert metrics["global_step"] == 30
        got = losses(tmp_path / f"from{at}")
        assert sorted(got) == list(range(at, 30)) and len(got) >= 20
        for step, loss in got.items():
            assert loss == pytest.approx(full[step], rel=1e-6, abs=1e-9), (at, step)


def test_exact_resume_after_kill_9(tiny_sdxl_dir, tmp_path):
    killed = tmp_path / "killed"
    proc = start(
        tiny_sdxl_dir, killed, "trainer.max_steps=100000", "callbacks.model_checkpoint.every_n_train_steps=3"
    )
    wait_for(killed / "checkpoints" / "step_0000006.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = killed / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(ckpt, weights_only=False)["global_step"]
    stop = resumed_from + 4
    resumed = tmp_path / "resumed"
    r = start(tiny_sdxl_dir, resumed, f"trainer.max_steps={stop}", f"ckpt_path={ckpt}")
    assert r.wait(timeout=300) == 0, r.stdout.read()[-3000:]
    full = tmp_path / "full"
    f = start(tiny_sdxl_dir, full, f"trainer.max_steps={stop}")
    assert f.wait(timeout=300) == 0
    got, want = losses(resumed), losses(full)
    assert sorted(got) == list(range(resumed_from, stop))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-6, abs=1e-9), step


def test_slurm_configs_compose(tmp_path, tiny_sdxl_dir):
    cfg = compose_cfg(["trainer=slurm", "hydra/launcher=slurm"], tmp_path)
    assert cfg.hydra.launcher.additional_parameters.signal == "USR1@120"
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    from hydra.utils import instantiate

    env = instantiate(cfg.trainer.plugins[1])
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue


def test_submitit_local_executor_runs_a_toy_job(tiny_sdxl_dir, tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", "experiment=smoke",
         f"model.pretrained={tiny_sdxl_dir}", "trainer.max_steps=2", "callbacks.sample_grid.prompts=[]",
         f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=5"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "TDD_ROOT": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(sweep.glob("*/metrics.json")), list(sweep.rglob("*"))[:20]


class DtypeProbe(L.Callback):
    """Records the dtypes of the frozen base and the LoRA tensors during training."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        frozen = {p.dtype for n, p in pl_module.unet.named_parameters() if "lora_" not in n}
        lora = {p.dtype for p in pl_module.roles.student_params + pl_module.roles.target_params}
        DtypeProbe.seen = {"frozen": frozen, "lora": lora}


@pytest.mark.parametrize(
    "overrides, frozen_dtype",
    [
        (["model.base_dtype=bf16", "trainer.precision=bf16-mixed"], torch.bfloat16),
        (["model.gradient_checkpointing=true"], torch.float32),
    ],
    ids=["bf16", "gradient_checkpointing"],
)
def test_bf16_base_and_gradient_checkpointing_train(overrides, frozen_dtype, tiny_sdxl_dir, tmp_path):
    """bf16: frozen base weights in bf16, LoRA master weights and optimizer state in fp32."""
    os.environ["TDD_ROOT"] = str(tmp_path)
    cfg = compose_cfg(
        ["experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "callbacks.sample_grid.prompts=[]",
         "trainer.max_steps=3", "data.batch_size=4",
         "+callbacks.probe._target_=tests.test_robustness.DtypeProbe", *overrides],
        tmp_path / "out",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and metrics["train/loss"] == metrics["train/loss"]  # finite, not NaN
    assert DtypeProbe.seen == {"frozen": {frozen_dtype}, "lora": {torch.float32}}
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
    state = ckpt["optimizer_states"][0]["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
