"""Scalar monitors: samples/s over the whole world, and histograms of t and s (wandb)."""

from __future__ import annotations

import time

import lightning as L

from tdd_lightning.errors import check_int


class SamplesPerSecond(L.Callback):
    """Logs train/samples_per_s: samples of all ranks per second of wall time, over a window of batches."""

    def __init__(self, window: int = 10):
        self.window = check_int("window", window)
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        size = len(batch["caption"]) if "caption" in batch else next(iter(batch.values())).shape[0]
        self._samples += size * trainer.world_size
        if self._t0 is None:  # the first step includes warm-up: start timing after it
            self._t0, self._samples = time.perf_counter(), 0
            return
        if (batch_idx + 1) % self.window == 0:
            dt = time.perf_counter() - self._t0
            pl_module.log("train/samples_per_s", self._samples / dt, rank_zero_only=True)
            self._t0, self._samples = time.perf_counter(), 0


class TimeHistograms(L.Callback):
    """Every N steps, histograms of the start times t and target times s to wandb (if it is a logger)."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = check_int("every_n_steps", every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps or not trainer.is_global_zero or not pl_module.last_times:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                hists = {
                    f"train/{k}_hist": wandb.Histogram(v.cpu().numpy())
                    for k, v in pl_module.last_times.items()
                }
                logger.experiment.log(hists | {"trainer/global_step": step})
