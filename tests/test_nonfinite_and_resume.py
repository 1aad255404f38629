"""last_good.ckpt holds a state from before the trouble, a budget on the total skipped fraction (issue 14,
item 8), and a resume refuses a checkpoint whose LoRA differs from the config (item 7)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.errors import UserError
from tdd_lightning.module import NonFiniteError
from tdd_lightning.training.run import train
from tests.hydra_utils import compose_cfg, smoke_overrides
from tests.test_robustness import nan_module


def smoke(tiny_sdxl_dir, *extra):
    return smoke_overrides(tiny_sdxl_dir, *extra, num_samples=16)


def test_lr_1e30_leaves_a_last_good_state_that_resumes_finite(tiny_sdxl_dir, tmp_path):
    """The first update at lr=1e30 is finite but destroys the LoRA; last_good must predate it."""
    out = tmp_path / "run"
    overrides = smoke(
        tiny_sdxl_dir, "optimizer.lr=1e30", "trainer.max_steps=10", "module.max_nonfinite_steps=3"
    )
    with pytest.raises(NonFiniteError, match=r"3 training steps in a row .* \(step 0, before the trouble\)"):
        train(compose_cfg(overrides, out))
    good = torch.load(out / "checkpoints" / "last_good.ckpt", weights_only=True)
    assert good["global_step"] == 0
    lora = [v for k, v in good["state_dict"].items() if "lora_" in k]
    assert lora and all(torch.isfinite(v).all() and v.abs().max() < 10 for v in lora)
    metrics = train(
        compose_cfg(smoke(tiny_sdxl_dir, f"ckpt_path={out}/checkpoints/last_good.ckpt"), tmp_path / "again")
    )
    assert metrics["global_step"] == 2 and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_a_run_that_skips_most_steps_fails_even_without_a_streak(tiny_sdxl_dir, tmp_path):
    """12 of 14 steps non-finite, never 10 in a row: the total budget stops it (exit 1), not exit 0."""
    bad = set(range(1, 7)) | set(range(8, 14))
    m = nan_module(tiny_sdxl_dir, steps=bad)
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=32, batch_size=2)
    trainer = L.Trainer(max_steps=14, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"12 of 14 training steps were skipped .*fraction=0\.1\)"):
        trainer.fit(m, datamodule=dm)


@pytest.mark.parametrize(
    "change, named",
    [
        ("model.lora.rank=4", "rank 8 in the checkpoint but 4 in the config"),
        ("model.lora.alpha=16", "alpha None in the checkpoint but 16 in the config"),
        (
            "model.lora.target_modules=[to_q,to_k]",
            "target_modules None in the checkpoint but ['to_q', 'to_k']",
        ),
    ],
)
def test_resume_refuses_a_different_lora_in_one_line(change, named, tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    train(compose_cfg(smoke(tiny_sdxl_dir), out))
    resume = smoke(tiny_sdxl_dir, "trainer.max_steps=4", "ckpt_path=auto", change)
    with pytest.raises(UserError, match=r"^cannot resume: its LoRA differs from model\.lora: ") as e:
        train(compose_cfg(resume, out))
    assert named in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_lora_tensors_of_another_model(tiny_sdxl_dir, tmp_path):
    out = tmp_path / "run"
    train(compose_cfg(smoke(tiny_sdxl_dir), out))
    path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k.replace("unet.", "unet.other_model."): v for k, v in ckpt["state_dict"].items()}
    ckpt.pop("tensor_checksum")
    torch.save(ckpt, tmp_path / "foreign.ckpt")
    with pytest.raises(UserError, match="none of its .* LoRA tensors has a name of this model's"):
        train(compose_cfg(smoke(tiny_sdxl_dir, "trainer.max_steps=4", f"ckpt_path={tmp_path}/foreign.ckpt"),
                          tmp_path / "run2"))  # fmt: skip
