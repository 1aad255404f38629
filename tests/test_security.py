"""No code runs from a checkpoint: every load is torch's weights-only loader (issue 14, item 1).

The crafted checkpoint below is a valid torch.save archive whose pickle calls ``open(marker, "w")`` when
unpickled; each path that reads checkpoints must refuse it in one line and leave the marker absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdd_lightning.checkpoint_io import AtomicCheckpointIO, CheckpointError, check_checkpoint, load_checkpoint
from tdd_lightning.errors import UserError
from tdd_lightning.training.run import check_config
from tests.hydra_utils import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


class _WritesAFile:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def crafted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": _WritesAFile(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_the_payload_is_live(crafted):
    """Sanity: an unrestricted load would run it (so the refusals below mean something)."""
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_the_checkpoint_readers_refuse_it(crafted):
    path, marker = crafted
    for read in (load_checkpoint, check_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=r"other than tensors .*\(io\.open\); refused"):
            read(path)
    assert not marker.exists()


def test_train_refuses_it_as_ckpt_path_and_as_a_planted_last_ckpt(crafted, tmp_path):
    path, marker = crafted
    with pytest.raises(UserError, match=r"^ckpt_path: checkpoint .* refused: loading it could run code$"):
        check_config(compose_cfg([f"ckpt_path={path}"], tmp_path / "run1"))
    run = tmp_path / "run2"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
    with pytest.raises(UserError, match="refused"):
        check_config(compose_cfg(["ckpt_path=auto"], run))
    assert not marker.exists()


def test_export_refuses_it_in_one_line(crafted, tmp_path):
    path, marker = crafted
    r = subprocess.run(
        [sys.executable, "-m", "tdd_lightning.export", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "refused" in r.stderr, r.stderr
    assert not marker.exists()


def test_a_real_training_checkpoint_still_loads(tmp_path):
    """What our checkpoints hold (tensors, numbers, strings, nested dicts) passes the weights-only loader."""
    ckpt = {
        "state_dict": {"unet.x.lora_A.student.weight": torch.zeros(2, 3)},
        "global_step": 5,
        "hyper_parameters": {"model": {"lora": {"rank": 2, "alpha": None, "target_modules": ["to_q"]}}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 1e-4}]}],
    }
    torch.save(ckpt, tmp_path / "ok.ckpt")
    assert check_checkpoint(tmp_path / "ok.ckpt")["global_step"] == 5


def test_a_bit_flip_in_a_saved_checkpoint_is_caught_on_load(tmp_path):
    """Issue 14, item 12: the tensor checksum written with every checkpoint is verified by every reader."""
    marker = torch.arange(4096, dtype=torch.int32) * 7919  # a byte pattern easy to find in the file
    ckpt = {"state_dict": {"unet.a.lora_A.student.weight": marker.float()}, "global_step": 2, "m": marker}
    path = tmp_path / "c.ckpt"
    AtomicCheckpointIO().save_checkpoint(ckpt, path)
    assert load_checkpoint(path)["global_step"] == 2  # intact: verified and loaded
    data = bytearray(path.read_bytes())
    at = data.find(marker.numpy().tobytes()) + 1000
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    for read in (load_checkpoint, check_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="fails its tensor checksum"):
            read(path)


def test_export_refuses_non_finite_lora_tensors(tmp_path):
    from tdd_lightning.export import export_lora

    lora = {
        "unet.down.attn.to_q.lora_A.student.weight": torch.ones(2, 8),
        "unet.down.attn.to_q.lora_B.student.weight": torch.tensor([[float("nan")] * 2] * 8),
    }
    ckpt = {"state_dict": lora, "global_step": 3, "hyper_parameters": {"model": {"lora": {"rank": 2}}}}
    with pytest.raises(CheckpointError, match=r"1 of the student LoRA tensors hold NaN or Inf \(first: "):
        export_lora(ckpt, tmp_path / "out", roles="student")
    lora["unet.down.attn.to_q.lora_B.student.weight"] = torch.full((8, 2), 1e6)  # finite, > fp16's max
    with pytest.raises(CheckpointError, match="after the cast to fp16"):
        export_lora(ckpt, tmp_path / "out", roles="student", dtype="fp16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["../../x", "..", "/etc", "a/../../b"])
def test_a_task_name_never_leads_outside_the_log_folder(task, tmp_path):
    """Issue 14, item 2: config values that become path components are sanitised."""
    from omegaconf import OmegaConf

    cfg = compose_cfg([f"task_name={task}", f"paths.log_dir={tmp_path}/logs"], tmp_path / "out")
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        folder = Path(OmegaConf.select(cfg, key)).resolve()
        assert folder.is_relative_to((tmp_path / "logs").resolve()), (key, folder)
        assert folder.parent.parent.parent == (tmp_path / "logs").resolve()  # logs/<task>/runs/<time>
