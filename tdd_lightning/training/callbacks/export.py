"""Write the exported LoRAs beside every checkpoint the trainer saves.

For ``checkpoints/step_0000500.ckpt`` this writes ``checkpoints/step_0000500_lora/{student,target}/``
with ``pytorch_lora_weights.safetensors`` (diffusers) and ``lora_kohya.safetensors`` (kohya / ComfyUI),
exactly what ``python -m tdd_lightning.export`` writes from that file. When a ModelCheckpoint removes an
old checkpoint (``save_top_k``), its LoRA folder goes with it.

How: the callback wraps the strategy's ``CheckpointIO`` for the run, so the export sees the very
checkpoint dict that was saved and its real path, after the write succeeded, on the rank that writes.
Strategies that write sharded checkpoints without the ``CheckpointIO`` (DeepSpeed, FSDP with
distributed checkpoints) get no files here: export from a consolidated checkpoint with the command.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from tdd_lightning.errors import ConfigError, check
from tdd_lightning.export import FORMATS, ROLES, _as_list, _roles, export_lora
from tdd_lightning.models.dtypes import DTYPES


def lora_dir_for(checkpoint_path: str | Path, suffix: str = "_lora") -> Path:
    """The folder beside a checkpoint that holds its exported LoRAs."""
    path = Path(checkpoint_path)
    return path.parent / f"{path.stem}{suffix}"


class _ExportingCheckpointIO(CheckpointIO):
    """Delegates to the strategy's CheckpointIO, then calls ``on_saved`` / ``on_removed``."""

    def __init__(
        self,
        inner: CheckpointIO,
        on_saved: Callable[[dict, Path], None],
        on_removed: Callable[[Path], None],
    ):
        self.inner, self.on_saved, self.on_removed = inner, on_saved, on_removed

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.on_saved(checkpoint, Path(path))

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)
        self.on_removed(Path(path))

    def teardown(self) -> None:
        self.inner.teardown()


class LoRAExport(L.Callback):
    """Export the student and/or EMA target LoRA beside each saved checkpoint.

    Args:
        roles: "student", "target", "ema", "both" (student and target) or "all" (every role the run keeps).
        formats: "diffusers", "kohya" or "both".
        dtype: None keeps the trained dtype (fp32: exact reproduction); fp16 / bf16 halve the files.
        suffix: the LoRA folder is ``<checkpoint stem><suffix>`` beside the checkpoint.
    """

    def __init__(
        self, roles: str = "all", formats: str = "both", dtype: str | None = None, suffix: str = "_lora"
    ):
        try:
            _roles(roles, {})
        except ValueError:
            raise ConfigError("roles", roles, f"choose from {ROLES}, 'both' or 'all'") from None
        try:
            _as_list(formats, FORMATS, "formats")
        except ValueError:
            raise ConfigError("formats", formats, f"choose from {FORMATS} or 'both'") from None
        check(dtype is None or dtype in DTYPES, "dtype", dtype, f"null or one of {', '.join(DTYPES)}")
        self.roles, self.formats, self.dtype, self.suffix = roles, formats, dtype, suffix
        self.exported: list[Path] = []  # LoRA folders written in this run, in order
        self._wrapped: _ExportingCheckpointIO | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            return
        self._wrapped = _ExportingCheckpointIO(trainer.strategy.checkpoint_io, self._export, self._remove)
        trainer.strategy.checkpoint_io = self._wrapped

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._wrapped is not None and trainer.strategy.checkpoint_io is self._wrapped:
            trainer.strategy.checkpoint_io = self._wrapped.inner
        self._wrapped = None

    def _export(self, checkpoint: dict[str, Any], path: Path) -> None:
        out = lora_dir_for(path, self.suffix)
        try:  # an export problem must not end a long run: warn and keep training
            export_lora(checkpoint, out, roles=self.roles, formats=self.formats, dtype=self.dtype)
        except Exception as e:
            rank_zero_warn(f"LoRAExport: could not export the LoRA of {path} to {out}: {e}")
            return
        self.exported.append(out)

    def _remove(self, path: Path) -> None:
        shutil.rmtree(lora_dir_for(path, self.suffix), ignore_errors=True)
