"""One run owns a folder (issue 14, item 5): a lock with pid and host, no fresh run over checkpoints, and
``ckpt_path=auto`` resuming the newest checkpoint of the folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tdd_lightning.errors import UserError
from tdd_lightning.training.run import resolve_ckpt_path, train
from tdd_lightning.training.run_folder import LOCK_NAME, RunFolderLock, newest_checkpoint
from tests.hydra_utils import compose_cfg, smoke_overrides

smoke = smoke_overrides


def test_a_live_owner_refuses_a_second_run(tmp_path):
    with RunFolderLock(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(UserError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()}"):
            RunFolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    with RunFolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "x"}))
    with pytest.raises(UserError, match="in use by pid 1 on node-17"):
        RunFolderLock(tmp_path).acquire()


def test_auto_resumes_the_newest_checkpoint_but_never_last_good(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for i, name in enumerate(["last.ckpt", "last-v1.ckpt", "last_good.ckpt"]):
        (ckpts / name).write_bytes(b"x")
        os.utime(ckpts / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    assert newest_checkpoint(tmp_path).name == "last-v1.ckpt"
    cfg = compose_cfg(["ckpt_path=auto"], tmp_path)
    assert resolve_ckpt_path(cfg) == str(ckpts / "last-v1.ckpt")


def test_fresh_run_over_checkpoints_is_refused_and_auto_resumes(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    assert train(compose_cfg(smoke(tiny_sdxl_dir), out))["global_step"] == 2
    with pytest.raises(UserError, match=r"already holds checkpoints .*resume them with ckpt_path=auto"):
        train(compose_cfg(smoke(tiny_sdxl_dir, "trainer.max_steps=4"), out))
    metrics = train(compose_cfg(smoke(tiny_sdxl_dir, "trainer.max_steps=4", "ckpt_path=auto"), out))
    assert metrics["global_step"] == 4
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step_0000002.ckpt",
        "step_0000004.ckpt",
    ]  # fmt: skip  (no last-v1.ckpt: one run wrote the folder at a time)


def test_train_refuses_a_folder_another_run_holds(tiny_sdxl_dir, tmp_path):
    with RunFolderLock(tmp_path / "run"), pytest.raises(UserError, match="is in use by pid"):
        train(compose_cfg(smoke(tiny_sdxl_dir), tmp_path / "run"))


class _FailsAtStep(__import__("lightning").Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("boom")


def test_a_crash_in_the_loop_saves_the_state_and_auto_resumes_it(tiny_sdxl_dir, tmp_path):
    """Issue 14, item 6: a late error costs at most the current step."""
    out = tmp_path / "run"
    overrides = smoke(
        tiny_sdxl_dir, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=100"
    )
    overrides += [
        "+callbacks.fails._target_=tests.test_run_folder._FailsAtStep", "+callbacks.fails.step=3",
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        train(compose_cfg(overrides, out))
    crash = out / "checkpoints" / "crash.ckpt"
    assert torch.load(crash, weights_only=True)["global_step"] == 3  # callbacks.crash_checkpoint, a default
    overrides = [o for o in overrides if "fails" not in o] + ["ckpt_path=auto"]
    assert resolve_ckpt_path(compose_cfg(overrides, out)) == str(crash)
    assert train(compose_cfg(overrides, out))["global_step"] == 4
