"""Checkpoint retention (issue 14, item 15): keep the last N periodic checkpoints and every M-th, with their
LoRA folders; never last/last_good/crash, never a file this run's ModelCheckpoint did not write."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.training.building import build
from tdd_lightning.training.callbacks import CheckpointRetention
from tdd_lightning.training.callbacks.retention import rotated_out
from tdd_lightning.training.run import train
from tests.hydra_utils import compose_cfg
from tests.test_run_folder import smoke


def test_the_policy_keeps_the_newest_and_the_multiples():
    saved = [(f"step_{s}.ckpt", s) for s in range(500, 5001, 500)]  # 500 ... 5000
    assert rotated_out(saved, keep_last=3, keep_every=2000) == [
        f"step_{s}.ckpt" for s in (500, 1000, 1500, 2500, 3000, 3500)
    ]  # kept: 2000, 4000 (multiples) and 4000, 4500, 5000 (the newest three)
    assert rotated_out(saved, keep_last=1, keep_every=None) == [p for p, _ in saved[:-1]]
    assert rotated_out(saved[:2], keep_last=3, keep_every=None) == []
    assert rotated_out([("a", 2), ("b", 4), ("a", 6)], keep_last=1, keep_every=None) == ["b"]  # a: re-saved


@pytest.mark.parametrize(
    "kwargs, key",
    [({"keep_last": 0}, "keep_last"), ({"keep_every": 0}, "keep_every"), ({"keep_last": True}, "keep_last")],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as e:
        CheckpointRetention(**kwargs)
    assert e.value.key == key


def test_a_bad_setting_is_refused_at_start_up_naming_the_config_key(tmp_path):
    node = compose_cfg(
        ["callbacks.retention.keep_last=0"], tmp_path
    ).callbacks.retention  # fmt: skip
    with pytest.raises(
        UserError, match=r"^callbacks\.retention\.keep_last=0 is invalid: must be an integer >= 1"
    ):
        build("callbacks.retention", node)


def fake_trainer(dirpath: Path, rank: int, step: int, best: str):
    mc = ModelCheckpoint(dirpath=dirpath, filename="step_{step:07d}")
    mc.best_model_path, mc.last_model_path = best, str(dirpath / "last.ckpt")
    return SimpleNamespace(
        checkpoint_callbacks=[mc], callbacks=[mc], is_global_zero=rank == 0, global_step=step
    )


def test_only_global_rank_zero_deletes(tmp_path):
    names = [f"step_{s:07d}.ckpt" for s in (1, 2, 3)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / name.replace(".ckpt", "_lora") / "student").mkdir(parents=True)
    for rank in (1, 0):
        keep = CheckpointRetention(keep_last=1, keep_every=None)
        for step, name in zip((1, 2, 3), names, strict=True):
            keep.on_train_batch_start(fake_trainer(tmp_path, rank, step, str(tmp_path / name)), None, None, 0)
        keep.on_train_end(fake_trainer(tmp_path, rank, 3, str(tmp_path / names[-1])), None)
        left = sorted(p.name for p in tmp_path.iterdir())
        if rank == 1:
            assert left == sorted(names + [n.replace(".ckpt", "_lora") for n in names]) and not keep.removed
    assert left == ["step_0000003.ckpt", "step_0000003_lora"]
    assert keep.removed == [str(tmp_path / n) for n in names[:2]]


def test_a_run_keeps_the_last_n_and_every_mth_across_a_resume(tiny_sdxl_dir, tmp_path):
    """6 steps, a checkpoint each step, keep_last=2, keep_every=3: step 3 and 6 (multiples), 5 and 6 (newest);
    resumed to 8 steps: 3 and 6, then 7 and 8; step 5 of the first part is rotated out after the resume."""
    out = tmp_path / "run"
    every_step = smoke(
        tiny_sdxl_dir, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=1"
    )
    overrides = [o for o in every_step if o != "~callbacks.lora_export"] + [
        "callbacks.retention.keep_last=2", "callbacks.retention.keep_every=3",
        "callbacks.lora_export.formats=diffusers", "callbacks.lora_export.roles=student",
    ]  # fmt: skip
    train(compose_cfg(overrides, out))
    ckpts = out / "checkpoints"

    def left() -> list[str]:
        return sorted(p.name for p in ckpts.iterdir())

    def expected(steps) -> list[str]:
        names = [f"step_{s:07d}{ext}" for s in steps for ext in (".ckpt", "_lora")]
        return sorted(["last.ckpt", "last_lora", *names])

    assert left() == expected([3, 5, 6])
    assert (ckpts / "step_0000005_lora" / "student" / "pytorch_lora_weights.safetensors").is_file()

    # files this run never wrote stay, whatever their names; so do last_good.ckpt and crash.ckpt
    foreign = ["step_0000001.ckpt", "last_good.ckpt", "crash.ckpt"]
    for name in foreign:
        (ckpts / name).write_bytes(b"not ours")
        os.utime(ckpts / name, (1, 1))  # old: `auto` resumes last.ckpt
    overrides = [o.replace("max_steps=6", "max_steps=8") for o in overrides] + ["ckpt_path=auto"]
    assert train(compose_cfg(overrides, out))["global_step"] == 8
    assert left() == sorted(expected([3, 6, 7, 8]) + foreign)


def test_checkpoints_of_another_folder_are_never_deleted(tmp_path):
    """Resumed from another run's checkpoint: its recorded files (and MC's restored path) are not ours."""
    other, mine = tmp_path / "other", tmp_path / "mine"
    for folder in (other, mine):
        folder.mkdir()
    theirs = [other / f"step_{s:07d}.ckpt" for s in (1, 2, 3)]
    for path in theirs:
        path.write_bytes(b"x")
    keep = CheckpointRetention(keep_last=1, keep_every=None)
    keep.load_state_dict({"saved": [[str(p), s] for p, s in zip(theirs, (1, 2, 3), strict=True)]})
    keep.on_train_batch_start(fake_trainer(mine, 0, 3, str(theirs[-1])), None, None, 0)
    (mine / "step_0000004.ckpt").write_bytes(b"x")
    keep.on_train_end(fake_trainer(mine, 0, 4, str(mine / "step_0000004.ckpt")), None)
    assert all(p.exists() for p in theirs) and keep.removed == []


def test_with_a_monitor_the_best_checkpoint_is_kept(tmp_path):
    names = [tmp_path / f"step_{s:07d}.ckpt" for s in (1, 2, 3)]
    for path in names:
        path.write_bytes(b"x")
    keep = CheckpointRetention(keep_last=1, keep_every=None)
    keep.load_state_dict({"saved": [[str(p), s] for p, s in zip(names, (1, 2, 3), strict=True)]})
    trainer = fake_trainer(tmp_path, 0, 3, str(names[0]))  # step 1 scored best
    trainer.checkpoint_callbacks[0].monitor = "train/loss"
    keep.on_train_end(trainer, None)
    assert [p.exists() for p in names] == [True, False, True] and keep.removed == [str(names[1])]
