"""Checkpoint files that are never half-written, and a readable error for ones that are.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target:
a kill -9 during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with write-then-rename saves."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def checkpoint_path(trainer, name: str = "last.ckpt") -> Path:
    """``name`` in the ModelCheckpoint folder (or the run folder when there is none)."""
    callback = trainer.checkpoint_callback
    folder = (
        Path(callback.dirpath)
        if callback is not None and callback.dirpath
        else Path(trainer.default_root_dir)
    )
    return folder / name


class CheckpointError(RuntimeError):
    pass


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU or raise CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, wrong format, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or corrupt? {type(e).__name__}: {str(e)[:120]})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint of this project (no state_dict/global_step)"
        )
    return ckpt
