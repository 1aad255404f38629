"""Preemption: SIGTERM or SIGUSR1 saves a checkpoint after the current step and ends the run cleanly.

SIGTERM: Lightning marks it and raises SIGTERMException at the next batch boundary; ``on_exception``
saves ``last.ckpt`` there. SIGUSR1 (outside SLURM auto-requeue, where Lightning saves and requeues by
itself): marked here, then at the end of the step the checkpoint is saved and the trainer stops.
Resume with ``ckpt_path=<checkpoints>/last.ckpt``.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tdd_lightning.checkpoint_io import checkpoint_path

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    def __init__(self, sigusr1: bool = True):
        self.sigusr1 = sigusr1
        self.requested: int | None = None
        self._previous = None

    def on_train_start(self, trainer, pl_module):
        if self.sigusr1 and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.requested is not None:
            path = self.save(trainer, f"signal {signal.Signals(self.requested).name}")
            trainer.should_stop = True
            self.requested = None
            log.info("resume with ckpt_path=%s", path)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            self.save(trainer, "SIGTERM")

    def on_train_end(self, trainer, pl_module):
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def save(self, trainer, reason: str) -> Path:
        path = checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            print(
                f"preempted ({reason}) after step {trainer.global_step}: checkpoint saved to {path}",
                flush=True,
            )
        return path
