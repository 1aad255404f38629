"""The offline cache's output folder: never over its inputs, never half-written where a good one was.

- ``check_output_folder``: refuses an output folder that is, contains or lies inside a folder of the
  input shards (symlinks resolved), and an existing non-empty folder unless ``overwrite``, which then
  replaces only a previous cache (a ``meta.json`` and nothing but ``*.tar``, ``uncond.safetensors``,
  ``meta.json``).
- ``StagedFolder``: the cache is written into ``.<name>.partial-<pid>`` beside the output folder and
  renamed into place once complete; on an error the partial folder is removed. ``clean_leftovers``
  (run by ``check_output_folder``) removes a killed run's partial folder, or puts back a previous cache
  that a run killed mid-rename had moved aside.
tests/test_data_robustness.py covers each case.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from tdd_lightning.checkpoint_io import pid_alive
from tdd_lightning.data.shards import is_url
from tdd_lightning.errors import UserError

CACHE_FILES = ("meta.json", "uncond.safetensors")  # besides the *.tar shards
PARTIAL, OLD = "partial", "old"


class OutputExistsError(UserError, FileExistsError):
    """The output folder already holds files and ``--overwrite`` was not given."""


def input_folders(shards: Sequence[str]) -> set[Path]:
    """The folders of the local shards: where each path points and where its target lives."""
    folders = set()
    for s in shards:
        if not is_url(s):
            folders |= {Path(s).parent.resolve(), Path(s).resolve().parent}
    return folders


def check_output_folder(shards: Sequence[str], out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved output folder, after refusing one that overlaps the inputs or holds a user's files."""
    out = Path(out_dir).expanduser().resolve()
    for folder in sorted(input_folders(shards)):
        if out == folder or out.is_relative_to(folder) or folder.is_relative_to(out):
            where = "is" if out == folder else "is inside" if out.is_relative_to(folder) else "contains"
            raise UserError(
                f"the output folder {out} {where} the input folder {folder}: "
                "write the cache to a separate folder (the input shards must stay untouched)"
            )
    clean_leftovers(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"the output {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise OutputExistsError(
            f"{out} exists and is not empty (pass --overwrite to replace the cache in it)"
        )
    if entries:
        foreign = [n for n in entries if not (n in CACHE_FILES or n.endswith(".tar"))]
        if "meta.json" not in entries or foreign:
            why = f"it holds {', '.join(foreign[:3])}" if foreign else "it has no meta.json"
            raise UserError(
                f"refusing to replace {out} with --overwrite: it is not a cache written by "
                f"tdd_lightning.data.encode ({why}); remove it yourself or choose another folder"
            )
    return out


def clean_leftovers(out: Path) -> None:
    """Remove partial folders of killed runs; put back a cache a killed run had moved aside."""
    for p in _leftovers(out, PARTIAL):
        shutil.rmtree(p, ignore_errors=True)
    for p in _leftovers(out, OLD):
        if not out.exists():
            os.rename(p, out)  # killed between the two renames of publish(): the old cache is back
        else:
            shutil.rmtree(p, ignore_errors=True)


def _leftovers(out: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-<pid>`` folders beside ``out`` whose process is gone."""
    found = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            found.append(p)
    return sorted(found)


class StagedFolder:
    """Write into a partial folder beside ``out``; ``publish()`` renames it into place.

    Used as a context manager: leaving the block without ``publish()`` (an error) removes the partial
    folder and leaves ``out`` as it was.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.{PARTIAL}-{os.getpid()}"
        self.published = False

    def __enter__(self) -> StagedFolder:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self

    def publish(self) -> None:
        """Move the complete cache into place (replacing a previous one, checked by check_output_folder)."""
        if self.out.is_dir() and any(self.out.iterdir()):
            old = self.out.parent / f".{self.out.name}.{OLD}-{os.getpid()}"
            os.rename(self.out, old)
            os.rename(self.path, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.path, self.out)  # POSIX rename replaces an empty folder
        self.published = True

    def __exit__(self, *exc) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
