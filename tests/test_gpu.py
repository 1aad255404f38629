"""CUDA paths (issue 19; part gpu_tests of `make device-check`): bf16-mixed against fp32, the LoRA
forward each role takes, DDP and FSDP on one GPU with checkpoint + resume, torch.compile, and no host
sync inside a training step. Marked ``gpu`` and skipped (with the reason) where CUDA is missing, so
the default suite only lists them as skipped; ``pytest -m gpu`` selects them."""

from __future__ import annotations

import csv
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make device-check)"),
]

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def make_module(tiny_sdxl_dir):
    from tdd_lightning.module import TDDModule
    from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection

    return TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": 4}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(p_empty=0.5),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        ema_decay=0.5,
    )


class FirstStep(L.Callback):
    """The first step's loss and whether every student gradient was finite."""

    def __init__(self):
        self.loss, self.grads_finite = None, None

    def on_after_backward(self, trainer, pl_module):
        if self.grads_finite is None:
            grads = [p.grad for p in pl_module.roles.student_params if p.grad is not None]
            self.grads_finite = bool(grads) and all(torch.isfinite(g).all().item() for g in grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss is None:
            self.loss = float(outputs["loss"])


def fit_gpu(tiny_sdxl_dir, precision: str, steps: int = 1):
    from tdd_lightning.data.synthetic import SyntheticDataModule

    module, probe = make_module(tiny_sdxl_dir), FirstStep()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
        callbacks=[probe], gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, datamodule=SyntheticDataModule(str(tiny_sdxl_dir), num_samples=16, batch_size=4))
    return module, probe


def test_bf16_mixed_step_is_finite_and_close_to_fp32(tiny_sdxl_dir):
    _, fp32 = fit_gpu(tiny_sdxl_dir, "32-true")
    _, bf16 = fit_gpu(tiny_sdxl_dir, "bf16-mixed")
    assert math.isfinite(bf16.loss) and bf16.grads_finite and fp32.grads_finite
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.1), (bf16.loss, fp32.loss)


def unet_inputs(tiny_sdxl_dir, unet, batch: int = 2):
    from tdd_lightning.models.families.sdxl import SDXL

    g = torch.Generator().manual_seed(0)
    (_, d1), (d2,) = SDXL.text_shapes(tiny_sdxl_dir).values()
    size, ch = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(batch, ch, size, size, generator=g).cuda()
    t = torch.tensor([100, 700]).cuda()
    c = {
        "prompt_embeds": torch.randn(batch, 77, d1, generator=g).cuda(),
        "pooled_prompt_embeds": torch.randn(batch, d2, generator=g).cuda(),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch).cuda(),
    }
    return x, t, c


def test_student_takes_peft_path_and_no_grad_roles_fuse_only_where_exact(tiny_sdxl_dir, tiny_components):
    import copy

    from peft.tuners import lora

    from tdd_lightning.models.families.sdxl import unet_eps
    from tdd_lightning.models.fused_lora import _mergeable

    module = make_module(tiny_sdxl_dir)
    module.attach(copy.deepcopy(tiny_components.unet), tiny_components.noise_scheduler.config)
    module.cuda()
    roles = module.roles
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero target LoRA, so merged and unmerged forwards really differ from base
        for name, p in module.unet.named_parameters():
            if "lora_B" in name and ".target" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    layer = next(m for m in roles.layers if isinstance(m, lora.Linear))
    x = torch.randn(3, layer.in_features, device="cuda")
    roles.use("student")
    assert _mergeable(layer, x) is None  # with grad on an accelerator: peft's low-rank backward
    with torch.no_grad():
        roles.use("target")
        assert _mergeable(layer, x) == "target"  # no grad, fp32, no autocast: merged
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert _mergeable(layer, x) is None  # autocast: peft (s B A would round to bf16)
        assert _mergeable(layer, x.half()) is None

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        xs, t, c = unet_inputs(tiny_sdxl_dir, module.unet)
        with torch.no_grad(), roles.role("target") as unet:
            merged = unet_eps(unet, xs, t, c).float()
            roles.set_fused(False)
            peft_out = unet_eps(unet, xs, t, c).float()
            roles.set_fused(True)
            with roles.role("teacher") as teacher:
                base = unet_eps(teacher, xs, t, c).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert (merged - base).abs().max() > 1e-3  # the target LoRA changes the output
    torch.testing.assert_close(merged, peft_out, rtol=1e-4, atol=1e-4)  # exact where fused


def run_train(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**ENV, "TDD_ROOT": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((out_dir / "csv" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def smoke(tiny_sdxl_dir, out: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke", f"model.pretrained={tiny_sdxl_dir}", "model.build_if_missing=false",
        "data.batch_size=2", "data.num_samples=16", "trainer.log_every_n_steps=1", "logger=csv",
        "callbacks.sample_grid.prompts=[]", "~callbacks.lora_export", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gpu_strategy_trains_checkpoints_and_resumes(strategy, tiny_sdxl_dir, tmp_path):
    common = [f"trainer={strategy}", "trainer.devices=1", "callbacks.model_checkpoint.every_n_train_steps=3"]
    full = tmp_path / "full"
    run_train(smoke(tiny_sdxl_dir, full, *common, "trainer.max_steps=5"), tmp_path)
    ckpts = sorted((full / "checkpoints").glob("step_0000003*"))
    assert ckpts, sorted(p.name for p in (full / "checkpoints").iterdir())
    resumed = tmp_path / "resumed"
    resume = smoke(tiny_sdxl_dir, resumed, *common, "trainer.max_steps=5", f"ckpt_path={ckpts[0]}")
    run_train(resume, tmp_path)
    a, b = losses(full), losses(resumed)
    assert sorted(a) == [0, 1, 2, 3, 4] and sorted(b) == [3, 4]
    assert all(math.isfinite(v) for v in a.values())
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-3), step


def test_compiled_unet_trains(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "compiled"
    run_train(smoke(tiny_sdxl_dir, out, "trainer=gpu", "model.compile=true", "trainer.max_steps=3"), tmp_path)
    got = losses(out)
    assert sorted(got) == [0, 1, 2] and all(math.isfinite(v) for v in got.values())


def test_no_host_sync_inside_a_training_step(tiny_sdxl_dir):
    from tdd_lightning.data.synthetic import SyntheticDataModule

    module, _ = fit_gpu(tiny_sdxl_dir, "bf16-mixed")
    module.cuda()
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=16, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        generators = module.step_generators(module.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.distillation_loss(batch, generators)["loss"]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()
