"""One run owns its folder: a lock file with pid and host, no fresh run over old checkpoints, and
``ckpt_path=auto`` resuming the newest checkpoint of the folder.

Two runs writing one folder race for ``last.ckpt`` and the periodic checkpoints; a fresh run into a folder
that holds checkpoints would make ``auto`` resume the wrong (older) state later. Both are refused at
start-up, with the way out in the message.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tdd_lightning.checkpoint_io import pid_alive
from tdd_lightning.errors import UserError

LOCK_NAME = ".run.lock"
NOT_RESUMED = ("last_good.ckpt",)  # kept for the user to choose: auto never resumes it by itself


def is_rank_zero() -> bool:
    """Global rank 0 (or a single process): the one process that owns the folder for the job."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var) not in (None, "", "0"):
            return False
    return True


class RunFolderLock:
    """``<folder>/.run.lock`` holding {pid, host, started}; a live owner on this host refuses a second run.

    A lock left by a process that no longer exists on this host is stale and taken over; a lock from
    another host is respected (its owner cannot be checked from here): the message says how to clear it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunFolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"run folder {self.path.parent}: could not take {self.path.name}")

    def _refuse_or_clear_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            self.path.unlink(missing_ok=True)  # unreadable: a crash mid-write; nobody can own it
            return
        if host == socket.gethostname() and not pid_alive(pid):
            self.path.unlink(missing_ok=True)
            return
        raise UserError(
            f"run folder {self.path.parent} is in use by pid {pid} on {host} (since {owner.get('started')}): "
            f"one run per folder; choose another (hydra.run.dir=...) or, if it is gone, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoints_in(folder: str | os.PathLike) -> list[Path]:
    """The run's resumable checkpoints (``<folder>/checkpoints/*.ckpt`` but last_good), newest first."""
    found = [p for p in (Path(folder) / "checkpoints").glob("*.ckpt") if p.name not in NOT_RESUMED]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def newest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = checkpoints_in(folder)
    return found[0] if found else None


def refuse_fresh_run_over_checkpoints(folder: str | os.PathLike) -> None:
    """A run that does not resume must not write into a folder that already holds checkpoints."""
    found = checkpoints_in(folder)
    if found:
        raise UserError(
            f"run folder {folder} already holds checkpoints ({found[0].name}, ...): resume them with "
            "ckpt_path=auto, or start the new run in another folder"
        )
