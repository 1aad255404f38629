"""A Lightning callback that writes each training step's wall time and epoch to a JSON file.

Used by the device check's toy part (``bench.device_check``) to measure it/s, samples/s and the first
step of each epoch (where DataLoader workers that are re-created each epoch stall). Added to a run with
``+callbacks.step_times._target_=tdd_lightning.bench.step_times.StepTimes +callbacks.step_times.path=F``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import lightning as L
import torch


class StepTimes(L.Callback):
    """Per step: seconds from the previous step's end (the first: from the fit loop's start), the epoch,
    the batch size and whether the loss was finite. On CUDA each step end synchronises (a measuring run).
    """

    def __init__(self, path: str):
        self.path = Path(path)
        self.steps: list[dict] = []
        self.last: float | None = None

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.last is None:
            self.last = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        finite = bool(math.isfinite(float(loss))) if loss is not None else None
        size = batch["latents"].shape[0] if isinstance(batch, dict) and "latents" in batch else None
        self.steps.append(
            {"s": now - self.last, "epoch": trainer.current_epoch, "batch_idx": batch_idx, "batch": size}
            | {"finite": finite}
        )
        self.last = now

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"steps": self.steps}, indent=1))
