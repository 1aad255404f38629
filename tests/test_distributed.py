"""Data parallel training on 2 CPU processes (gloo) equals one process with the same global batch."""

import functools
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, HingeAdversarial, PseudoHuberLoss, TDDSelection
from tdd_lightning.training.optim import ConstantWithWarmup

STEPS, GLOBAL_BATCH = 4, 4


class SaveState(L.Callback):
    """Each rank writes its student LoRA, its adversarial heads (if any) and its lr at the end of fit."""

    def __init__(self, folder: Path, tag: str):
        self.folder, self.tag = folder, tag

    def on_train_end(self, trainer, pl_module):
        lora = {n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                for n, p in pl_module.roles.named_student_params().items()}  # fmt: skip
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        heads = pl_module.discriminator
        heads = {k: v.detach().clone() for k, v in heads.state_dict().items()} if heads is not None else {}
        if trainer.is_global_zero or not hasattr(next(iter(pl_module.roles.student_params)), "full_tensor"):
            torch.save({"lora": lora, "lr": lr, "heads": heads},
                       self.folder / f"{self.tag}_rank{trainer.global_rank}.pt")  # fmt: skip


def fit(tiny_sdxl_dir, folder, tag, devices, strategy, adversarial=False):
    module = TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": 4}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(p_empty=0.5),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=ConstantWithWarmup(8)),
        ema_decay=0.5,
        adversarial=HingeAdversarial(lr=1e-3) if adversarial else None,
    )
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=32, batch_size=GLOBAL_BATCH // devices)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
        callbacks=[SaveState(folder, tag)], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)


def compare(a: dict, b: dict, atol=1e-4):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |LoRA difference| = {worst:.3g}")
    assert worst <= atol, worst
    return worst


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tiny_sdxl_dir, tmp_path):
    fit(tiny_sdxl_dir, tmp_path, "single", 1, "auto")
    fit(tiny_sdxl_dir, tmp_path, "ddp", 2, "ddp_fork")
    single = torch.load(tmp_path / "single_rank0.pt")
    r0, r1 = torch.load(tmp_path / "ddp_rank0.pt"), torch.load(tmp_path / "ddp_rank1.pt")
    assert compare(r0["lora"], r1["lora"], atol=0) == 0  # ranks hold identical LoRA weights
    compare(single["lora"], r0["lora"])  # = one process with the same global batch
    # the schedule counts optimizer steps, whatever the world size: warm-up 8, after 4 steps lr = 1e-3 * 5/8
    assert single["lr"] == r0["lr"] == pytest.approx(1e-3 * 5 / 8)
    moved = max(v.abs().max().item() for k, v in single["lora"].items() if "lora_B" in k)
    assert moved > 1e-4  # the LoRA really trained


def fit_in_subprocess(tiny_sdxl_dir, folder, tag, strategy, *extra):
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "tests.distributed_fit", "--model", str(tiny_sdxl_dir), "--out", str(folder),
           "--tag", tag, "--strategy", strategy, *extra]  # fmt: skip
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_fsdp2_two_processes_equal_ddp(tiny_sdxl_dir, tmp_path):
    """FSDP2 (ModelParallelStrategy, fully_shard per block) on CPU with gloo; gathered LoRA = DDP's."""
    fit(tiny_sdxl_dir, tmp_path, "ddp", 2, "ddp_fork")
    fit_in_subprocess(tiny_sdxl_dir, tmp_path, "fsdp", "fsdp2")
    ddp, fsdp = torch.load(tmp_path / "ddp_rank0.pt"), torch.load(tmp_path / "fsdp_rank0.pt")
    compare(ddp["lora"], fsdp["lora"], atol=1e-4)
    assert ddp["lr"] == fsdp["lr"]
