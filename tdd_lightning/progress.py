"""Progress bars for the long jobs that are not training (tqdm, on stderr; training has Lightning's own).

On a terminal the bar redraws in place. When stderr is not a terminal (a log file, CI, a subprocess
pipe) an in-place bar would pile its redraws into the log; there it prints its state as one plain line
at the start, at most once every ``LOG_INTERVAL_S`` seconds, and at the end, so a job of minutes still
shows it is alive. ``enabled=False`` (a tool's ``--no-progress``) prints nothing.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable

from tqdm.std import tqdm

LOG_INTERVAL_S = 60.0  # seconds between status lines when stderr is not a terminal


class _LogLines(io.TextIOBase):
    """A file for tqdm that writes each redraw of the bar as one line on stderr (read at each write)."""

    def write(self, s: str) -> int:
        line = s.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    **kwargs,
) -> tqdm:
    """A tqdm bar on stderr: in place on a terminal, a line a minute otherwise, nothing if not ``enabled``.

    Use it as tqdm: iterate over it, or ``with progress_bar(total=n) as bar: ... bar.update(k)``.
    Postfixes should be set with ``refresh=False`` so that only the interval decides when a line is written.
    """
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, **kwargs)
    kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, ncols=100)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_LogLines(), **kwargs)
