"""Crash checkpoint: any exception inside the training loop saves the state first, so no crash costs more
than the current step.

On an exception after at least one optimizer step, ``checkpoints/crash.ckpt`` is written (atomically, like
every checkpoint) and the exception then propagates as usual; ``ckpt_path=auto`` resumes from it, since it
is the newest checkpoint of the run. Signals (handled by ``Preemption``) and the non-finite stop (which
saves ``last_good.ckpt`` itself) are left to their own handlers.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tdd_lightning.checkpoint_io import checkpoint_path

log = logging.getLogger(__name__)
CRASH_NAME = "crash.ckpt"


class CrashCheckpoint(L.Callback):
    def __init__(self, filename: str = CRASH_NAME):
        self.filename = filename
        self.saved_to = None

    def on_exception(self, trainer, pl_module, exception):
        from tdd_lightning.module import NonFiniteError  # lazy: callbacks import no module at start-up

        if isinstance(exception, (SIGTERMException, NonFiniteError)) or trainer.global_step == 0:
            return
        path = checkpoint_path(trainer, self.filename)
        try:
            if trainer.world_size == 1:
                trainer.save_checkpoint(path)
            elif trainer.is_global_zero and type(trainer.strategy).__name__.startswith("DDP"):
                # no barrier: the other ranks may never reach one; rank 0 holds the whole (replicated) LoRA
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            else:
                return  # sharded state needs every rank: the periodic checkpoints are the fallback
        except Exception as e:  # never hide the original error behind the save's
            log.error("could not save the crash checkpoint %s: %s", path, e)
            return
        self.saved_to = path
        if trainer.is_global_zero:
            print(
                f"crashed ({type(exception).__name__}) after step {trainer.global_step}: state saved to "
                f"{path}; resume with ckpt_path=auto (or ckpt_path=<that file>)",
                flush=True,
            )
