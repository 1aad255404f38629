"""Checkpoint retention: keep the last N periodic checkpoints and every M-th, delete the rest.

With ``save_top_k: -1`` the ModelCheckpoint keeps every periodic ``step_*.ckpt`` (and LoRAExport a
``<ckpt>_lora/`` folder beside each): an SDXL run saving every 500 steps piles up hundreds of GB over
100k steps. This callback deletes a periodic checkpoint and its LoRA folder once it is neither among the
``keep_last`` newest nor at a step that is a multiple of ``keep_every``.

What it may delete: only checkpoints that this run's ModelCheckpoint wrote (its ``best_model_path`` /
``best_k_models`` entries, which it sets just before each periodic save), inside that callback's
folder. The list survives a resume (it is part of this callback's checkpoint state), so the earlier
parts of a preempted run are rotated too; files it never saw (a copied-in checkpoint, another run's)
are never touched, and neither are ``last.ckpt``, ``last_good.ckpt``, ``crash.ckpt`` and (with a
``monitor``) the best checkpoint. It is meant for ``save_top_k: -1`` without a monitor. Deletion
happens on global rank 0 only, at the start of the next training step and at the end of training,
never while a save is in flight or after an exception.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from tdd_lightning.errors import check
from tdd_lightning.training.callbacks.export import LoRAExport, lora_dir_for

log = logging.getLogger(__name__)
PROTECTED = ("last.ckpt", "last_good.ckpt", "crash.ckpt")  # never deleted, whoever wrote them


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rotated_out(saved: Sequence[tuple[str, int]], keep_last: int, keep_every: int | None) -> list[str]:
    """The paths of ``saved`` ((path, global step), oldest first) that the policy no longer keeps."""
    newest_first = sorted({p: s for p, s in saved}.items(), key=lambda ps: ps[1], reverse=True)
    return [
        path
        for i, (path, step) in enumerate(newest_first)
        if i >= keep_last and not (keep_every and step % keep_every == 0)
    ][::-1]


class CheckpointRetention(L.Callback):
    """Keep the ``keep_last`` newest periodic checkpoints and those at multiples of ``keep_every`` steps.

    Args:
        keep_last: how many of the newest periodic checkpoints to keep (>= 1: the newest is always kept).
        keep_every: also keep every checkpoint whose global step is a multiple of this (null: none).
    """

    def __init__(self, keep_last: int = 3, keep_every: int | None = 10000):
        check(
            _is_int(keep_last) and keep_last >= 1,
            "keep_last", keep_last, "must be an integer >= 1 (the newest checkpoint is always kept)",
        )  # fmt: skip
        check(
            keep_every is None or (_is_int(keep_every) and keep_every >= 1),
            "keep_every", keep_every, "must be null (keep no extra checkpoints) or an integer >= 1",
        )  # fmt: skip
        self.keep_last, self.keep_every = keep_last, keep_every
        self.saved: list[tuple[str, int]] = []  # (path, global step) of every periodic save seen, in order
        self.removed: list[str] = []  # deleted by this process (for logs and tests)

    # ---- which files are ours -------------------------------------------------------------------------
    @staticmethod
    def _checkpointers(trainer: L.Trainer) -> list[ModelCheckpoint]:
        return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]

    def _record_new_saves(self, trainer: L.Trainer) -> None:
        """Add the periodic checkpoints the ModelCheckpoints have named since the last look."""
        known = {p for p, _ in self.saved}
        for mc in self._checkpointers(trainer):
            for path in [mc.best_model_path, *mc.best_k_models]:
                path = str(path) if path else ""
                if path and path not in known and path != mc.last_model_path and self._inside(path, mc):
                    self.saved.append((path, trainer.global_step))
                    known.add(path)

    @staticmethod
    def _inside(path: str, mc: ModelCheckpoint) -> bool:
        return Path(path).parent.resolve() == Path(mc.dirpath).resolve()

    def _deletable(self, path: str, checkpointers: Sequence[ModelCheckpoint]) -> bool:
        """In a ModelCheckpoint's folder; not a protected name, ``last`` or the target of a ``last`` link."""
        if Path(path).name in PROTECTED or not any(self._inside(path, mc) for mc in checkpointers):
            return False
        lasts = [mc.last_model_path for mc in checkpointers if mc.last_model_path]
        lasts += [mc.best_model_path for mc in checkpointers if mc.monitor and mc.best_model_path]  # the best
        here = os.path.realpath(path)
        return all(here not in (os.path.abspath(last), os.path.realpath(last)) for last in lasts)

    # ---- deleting ----------------------------------------------------------------------------------------
    def _rotate(self, trainer: L.Trainer) -> None:
        self._record_new_saves(trainer)
        if not trainer.is_global_zero:
            return
        checkpointers = self._checkpointers(trainer)
        suffixes = {"_lora"} | {c.suffix for c in trainer.callbacks if isinstance(c, LoRAExport)}
        gone = set()
        for path in rotated_out(self.saved, self.keep_last, self.keep_every):
            if self._deletable(path, checkpointers) and self._delete(Path(path), suffixes):
                gone.add(path)
        self.saved = [(p, s) for p, s in self.saved if p not in gone]

    def _delete(self, path: Path, suffixes: Iterable[str]) -> bool:
        try:
            if path.is_dir():  # a sharded (distributed) checkpoint is a folder
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            for suffix in suffixes:
                shutil.rmtree(lora_dir_for(path, suffix), ignore_errors=True)
        except OSError as e:  # a file we cannot delete must not end the run
            rank_zero_warn(f"CheckpointRetention: could not delete {path}: {e}")
            return False
        self.removed.append(str(path))
        log.info("checkpoint retention: removed %s", path)
        return True

    # ---- hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for mc in self._checkpointers(trainer):
            every = getattr(mc, "_every_n_train_steps", 0) or 0  # ModelCheckpoint(every_n_train_steps=...)
            if self.keep_every and every and self.keep_every % every:
                rank_zero_warn(
                    f"CheckpointRetention: keep_every={self.keep_every} is not a multiple of the checkpoint "
                    f"interval ({every} steps): only checkpoints at common multiples are kept as every-M-th"
                )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A periodic save has just been named: record it in the state this very checkpoint carries."""
        self._record_new_saves(trainer)
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        self._rotate(trainer)  # the previous step's saves are complete

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rotate(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"saved": [[p, s] for p, s in self.saved]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = [(str(p), int(s)) for p, s in state_dict.get("saved", [])]
