"""The evaluation EMA (LoRA role ``ema``): its warm-up, its update after every optimizer step, that it
never changes training, that it survives a resume and that it is exported like the target."""

import functools

import lightning as L
import pytest
import torch

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.models.roles import warmup_decay
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, PseudoHuberLoss, TDDSelection


def make(tiny_sdxl_dir, eval_ema_decay):
    m = TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": 4}},
        target_selection=TDDSelection(),
        guidance=DecoupledGuidance(),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        ema_decay=0.5,
        eval_ema_decay=eval_ema_decay,
    )
    m.configure_model()
    return m


class Record(L.Callback):
    """Student tensors after every step and the losses (to replay the EMA by hand)."""

    def __init__(self):
        self.students, self.losses = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.students.append([p.detach().clone() for p in pl_module.roles.student_params])
        self.losses.append(float(outputs["loss"]))


def fit(m, steps, tiny_sdxl_dir, **kwargs):
    rec = Record()
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=8, batch_size=4)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        callbacks=[rec], **kwargs,
    )  # fmt: skip
    trainer.fit(m, datamodule=dm)
    return rec, trainer


def test_warmup_decay_by_hand():
    assert warmup_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert warmup_decay(0.999, 10) == pytest.approx(11 / 20)
    assert warmup_decay(0.999, 600) == pytest.approx(601 / 610)
    assert warmup_decay(0.9, 10**6) == 0.9  # capped by the decay


def test_ema_follows_the_student_by_the_warmed_up_decay_and_leaves_training_alone(tiny_sdxl_dir):
    off = make(tiny_sdxl_dir, 0.0)
    assert off.roles.ema_params == [] and "ema" not in off.roles.adapters
    with pytest.raises(ValueError, match="evaluation EMA is off"):
        off.roles.use("ema")
    plain, _ = fit(off, 3, tiny_sdxl_dir, enable_checkpointing=False)

    on = make(tiny_sdxl_dir, 0.999)
    start = [p.detach().clone() for p in on.roles.student_params]
    torch.testing.assert_close(on.roles.ema_params, start)  # the EMA starts as the student
    rec, _ = fit(on, 3, tiny_sdxl_dir, enable_checkpointing=False)
    assert rec.losses == plain.losses  # the EMA never enters the training step
    for a, b in zip(rec.students[-1], plain.students[-1], strict=True):
        assert torch.equal(a, b)
    ema = start
    for n, student in enumerate(rec.students):  # replay: ema <- d ema + (1 - d) student, d = warmup(n)
        d = warmup_decay(0.999, n)
        ema = [d * e + (1 - d) * s for e, s in zip(ema, student, strict=True)]
    torch.testing.assert_close(on.roles.ema_params, ema, rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in on.roles.ema_params)
    assert max((e - s).abs().max().item() for e, s in zip(ema, rec.students[-1], strict=True)) > 1e-5


def test_ema_is_checkpointed_resumed_and_exported(tiny_sdxl_dir, tmp_path):
    from tdd_lightning.export import export_lora, lora_tensors, read_metadata

    m = make(tiny_sdxl_dir, 0.99)
    _, trainer = fit(m, 2, tiny_sdxl_dir, default_root_dir=tmp_path)
    ckpt_path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt_path)
    straight = make(tiny_sdxl_dir, 0.99)
    fit(straight, 4, tiny_sdxl_dir, enable_checkpointing=False)

    resumed = make(tiny_sdxl_dir, 0.99)
    rec = Record()
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=8, batch_size=4)
    L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[rec],
        default_root_dir=tmp_path / "resumed",
    ).fit(resumed, datamodule=dm, ckpt_path=ckpt_path)  # fmt: skip
    torch.testing.assert_close(resumed.roles.ema_params, straight.roles.ema_params, rtol=0, atol=0)

    ckpt = torch.load(ckpt_path, weights_only=True)
    files = export_lora(ckpt, tmp_path / "lora", formats="diffusers")  # default roles: all it holds
    assert sorted({r for r, _ in files}) == ["ema", "student", "target"]
    assert read_metadata(files["ema", "diffusers"])["role"] == "ema"
    ema = lora_tensors(ckpt["state_dict"], "ema")
    assert any(not torch.equal(ema[k], v) for k, v in lora_tensors(ckpt["state_dict"], "student").items())
    assert sorted({r for r, _ in export_lora(ckpt, tmp_path / "two", roles="both")}) == ["student", "target"]

    # a run without the EMA exports its two roles by default, and refuses ema by name
    plain = make(tiny_sdxl_dir, 0.0)
    _, t2 = fit(plain, 1, tiny_sdxl_dir, default_root_dir=tmp_path / "plain")
    t2.save_checkpoint(tmp_path / "plain.ckpt")
    plain_ckpt = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert sorted({r for r, _ in export_lora(plain_ckpt, tmp_path / "p")}) == ["student", "target"]
    from tdd_lightning.checkpoint_io import CheckpointError

    with pytest.raises(CheckpointError, match="no LoRA tensors for role 'ema'"):
        export_lora(plain_ckpt, tmp_path / "p2", roles="ema")
