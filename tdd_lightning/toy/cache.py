"""The toy evaluation's disk cache of teacher results: never half-written, checked on every read.

Two kinds of entries, both named by a key (a hash of the teacher and the settings): ``<key>.json``, the
metrics of one teacher cell, and ``<key>.pt``, the evaluator features of a teacher reference. Writes go
through :func:`~tdd_lightning.checkpoint_io.atomic_write` and record the key inside the file. A read
that finds a truncated or corrupt file, or one whose key, metrics or tensor shape is not what was asked
for, deletes it with a warning and answers "not cached", so the caller recomputes it: a bad cache file
costs one recomputation, never a crash. Opening the cache removes the temp files of writers killed
mid-write. A write that fails (disk full, a vanished temp file) warns and leaves the entry uncached.

Files from before keys were recorded (a bare metrics dict, a bare feature tensor) are still read when
their metrics and shape check out.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tdd_lightning.checkpoint_io import atomic_write, remove_stale_temp_files
from tdd_lightning.errors import is_number

CELL_METRICS = ("prompt_acc", "fd", "agree")  # a cached teacher cell holds at least these numbers


class CacheWarning(UserWarning):
    """A cache file was unusable and is recomputed."""


class TeacherCache:
    """``<folder>/<key>.json`` (a teacher cell's metrics) and ``<folder>/<key>.pt`` (reference features)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        remove_stale_temp_files(self.folder)

    def path(self, key: str, suffix: str) -> Path:
        return self.folder / f"{key}{suffix}"

    # ---- teacher cells ---------------------------------------------------------------------------
    def read_cell(self, key: str) -> dict[str, float] | None:
        """The cached metrics of cell ``key``, or None (not cached, or an unusable file now deleted)."""
        path = self.path(key, ".json")
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return self._discard(path, f"unreadable ({type(e).__name__})")
        if isinstance(payload, Mapping) and "key" in payload:  # the current format: {"key", "cell"}
            if payload["key"] != key:
                return self._discard(path, f"it holds key {payload['key']!r}")
            payload = payload.get("cell")
        if not isinstance(payload, Mapping):
            return self._discard(path, "not a metrics record")
        missing = [m for m in CELL_METRICS if not is_number(payload.get(m))]
        if missing or not all(is_number(v) for v in payload.values()):
            return self._discard(path, f"bad or missing metrics {missing or sorted(payload)}")
        return dict(payload)

    def write_cell(self, key: str, cell: Mapping[str, float]) -> None:
        text = json.dumps({"key": key, "cell": dict(cell)})
        self._write(self.path(key, ".json"), lambda tmp: tmp.write_text(text))

    # ---- reference features ------------------------------------------------------------------------
    def read_features(self, key: str, shape: Sequence[int]) -> torch.Tensor | None:
        """The cached feature tensor ``key`` of exactly ``shape`` (float64), or None (recompute it)."""
        path = self.path(key, ".pt")
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated (RuntimeError, EOFError), corrupt (UnpicklingError), ...
            return self._discard(path, f"unreadable ({type(e).__name__})")
        if isinstance(payload, Mapping):  # the current format: {"key", "features"}
            if payload.get("key") != key:
                return self._discard(path, f"it holds key {payload.get('key')!r}")
            payload = payload.get("features")
        if not isinstance(payload, torch.Tensor):
            return self._discard(path, "not a tensor")
        if tuple(payload.shape) != tuple(shape) or payload.dtype != torch.float64:
            return self._discard(
                path, f"{payload.dtype} {tuple(payload.shape)}, expected torch.float64 {tuple(shape)}"
            )
        if not torch.isfinite(payload).all():
            return self._discard(path, "non-finite values")
        return payload

    def write_features(self, key: str, features: torch.Tensor) -> None:
        payload = {"key": key, "features": features.detach().cpu()}
        self._write(self.path(key, ".pt"), lambda tmp: torch.save(payload, tmp))

    # ---- helpers ---------------------------------------------------------------------------------
    def _write(self, path: Path, write) -> None:
        try:
            atomic_write(path, write)
        except OSError as e:  # a cache that cannot be written only costs a recomputation next time
            warnings.warn(
                f"toy eval cache: could not write {path} ({e}); not cached", CacheWarning, stacklevel=3
            )

    @staticmethod
    def _discard(path: Path, why: str) -> None:
        warnings.warn(
            f"toy eval cache: {path} is unusable ({why}); deleted, recomputing", CacheWarning, stacklevel=3
        )
        path.unlink(missing_ok=True)
        return None
