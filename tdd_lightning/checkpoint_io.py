"""Checkpoint files that are never half-written, and a readable error for ones that are.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target:
a kill -9 during a save leaves the previous checkpoint intact, and the temp file it leaves behind is
removed at the next start (``remove_stale_temp_files``).
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tdd_lightning.errors import UserError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)$")  # atomic_write's ".<name>.tmp-<pid>"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (unknown: assumed alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a pid we cannot check): leave its file alone
    return True


def remove_stale_temp_files(folder: str | os.PathLike, depth: int = 0) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files that a writer killed mid-write (kill -9) left in ``folder``.

    Only files whose pid is no longer alive on this host are removed (a live writer keeps its file;
    a pid reused since is kept too, harmlessly). ``depth`` also looks that many subfolder levels down
    (2: the ``<ckpt>_lora/<role>/`` exports beside checkpoints). Returns the removed paths; a missing
    folder is not an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for level in range(depth + 1):
        for path in folder.glob("*/" * level + ".*.tmp-*"):
            match = _TEMP_NAME.match(path.name)
            if match and path.is_file() and not pid_alive(int(match[1])):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


CHECKSUM_KEY = "tensor_checksum"  # blake2b of every tensor in the checkpoint (AtomicCheckpointIO writes it)


def tensor_checksum(obj: Any) -> str:
    """blake2b of every tensor in ``obj`` (dicts walked in sorted key order): dtype, shape and bytes.

    Bit flips in storage or transfer change it; the top-level checksum entry itself is left out.
    """
    digest = hashlib.blake2b(digest_size=16)

    def walk(o: Any, where: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            digest.update(f"{where}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, Mapping):
            for k in sorted(o, key=str):
                if not (where == "" and k == CHECKSUM_KEY):
                    walk(o[k], f"{where}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]")

    walk(obj, "")
    return digest.hexdigest()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with write-then-rename saves and pickle-free loads.

    Loads always use ``weights_only=True``: a checkpoint is data (tensors, numbers, strings, dicts), never
    code, so a crafted ``.ckpt`` (given as ``ckpt_path`` or planted as ``last.ckpt``) cannot run anything.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        checkpoint = {**checkpoint, CHECKSUM_KEY: tensor_checksum(checkpoint)}
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


def checkpoint_path(trainer, name: str = "last.ckpt") -> Path:
    """``name`` in the ModelCheckpoint folder (or the run folder when there is none)."""
    callback = trainer.checkpoint_callback
    folder = (
        Path(callback.dirpath)
        if callback is not None and callback.dirpath
        else Path(trainer.default_root_dir)
    )
    return folder / name


def clean_checkpoint_folder(trainer) -> list[Path]:
    """On global rank 0: remove the temp files a killed save left in the checkpoint folder and in the
    ``<ckpt>_lora/<role>/`` exports beside it. Call it before ``trainer.fit``, while nothing is saved."""
    if not trainer.is_global_zero:
        return []
    return remove_stale_temp_files(checkpoint_path(trainer).parent, depth=2)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or not a Lightning checkpoint (one-line reason)."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU (memory-mapped, ``weights_only``) or raise CheckpointError.

    Only plain data is unpickled (torch's ``weights_only`` loader): a file that asks for any other object,
    the way a crafted pickle runs code, is refused with one line.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder (a sharded checkpoint?): give a single .ckpt file"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save was interrupted")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or corrupt? {size} bytes, not a complete "
            "torch.save archive)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"checkpoint {path} cannot be read (corrupt pickle: {e})") from None
        wanted = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data "
            f"({wanted[1] if wanted else 'a Python object'}); refused: loading it could run code"
        ) from None
    except Exception as e:  # RuntimeError, EOFError, UnpicklingError, ... for broken files
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt? {reason})") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    if CHECKSUM_KEY in ckpt and tensor_checksum(ckpt) != ckpt[CHECKSUM_KEY]:
        raise CheckpointError(
            f"checkpoint {path} fails its tensor checksum: its contents changed after it was written "
            "(disk or copy error); use another checkpoint"
        )
    return dict(ckpt)


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint to resume from: readable, with a state_dict and a global_step."""
    ckpt = load_checkpoint(path)
    if "global_step" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} has no global_step: not a training checkpoint of this project"
        )
    return ckpt


# ---- training state: snapshots of good steps, and the LoRA a resume expects ---------------------
class GoodStates:
    """The last two full training states taken at good steps (on the CPU), for ``last_good.ckpt``.

    A streak of non-finite steps can follow a finite but destructive update (lr=1e30): the state right
    before the streak is then already bad, so the one kept is the newest taken at least one good step
    before the streak began.
    """

    def __init__(self, keep: int = 2):
        self.keep, self.states = keep, []

    SHARDED = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")

    def take(self, trainer) -> None:
        if type(trainer.strategy).__name__ in self.SHARDED:
            # a sharded optimizer state dict is built by a collective that initialises empty optimizer
            # state with a step (torch.distributed.checkpoint): not free, and not side-effect free
            return
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self.states = [*self.states, _to_cpu(state)][-self.keep :]

    def before(self, streak_start: int) -> dict | None:
        """The newest state from at least one good step before the streak (whose first step began at
        ``streak_start``); else the one right before it; else None."""
        early = [s for s in self.states if s["global_step"] <= streak_start - 1]
        if early:
            return early[-1]
        right_before = [s for s in self.states if s["global_step"] <= streak_start]
        return right_before[-1] if right_before else None


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def check_lora_matches(checkpoint: dict, lora: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a resume whose LoRA differs from the config's: rank, alpha, targets, tensor names and shapes."""
    saved = dict((checkpoint.get("tdd_lightning") or {}).get("lora") or {})
    diffs = [
        f"{key} {saved[key]!r} in the checkpoint but {lora.get(key)!r} in the config"
        for key in ("rank", "alpha", "target_modules")
        if key in saved and saved[key] != lora.get(key)
    ]
    expected = {k: v for k, v in state.items() if "lora_" in k}
    found = {k: v for k, v in checkpoint.get("state_dict", {}).items() if "lora_" in k}
    if found and not set(found) & set(expected):
        diffs.append(
            f"none of its {len(found)} LoRA tensors has a name of this model's (another base model?)"
        )
    elif set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        parts = [f"{len(missing)} of the model's LoRA tensors missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} tensors the model does not have (e.g. {extra[0]})"] if extra else []
        diffs.append(", ".join(parts))
    shapes = [k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape)]
    if shapes and not diffs:
        k = sorted(shapes)[0]
        diffs.append(f"{len(shapes)} LoRA tensors of another shape (e.g. {k}: {tuple(found[k].shape)} "
                     f"in the checkpoint, {tuple(expected[k].shape)} here)")  # fmt: skip
    if diffs:
        raise CheckpointError("cannot resume: its LoRA differs from model.lora: " + "; ".join(diffs))
