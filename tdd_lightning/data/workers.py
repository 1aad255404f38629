"""DataLoader workers leave the job's signals to the main process.

SLURM (and ``kill -- -PGID``, Ctrl-C in a terminal) signals every process of the job step. A worker that
dies of SIGTERM or SIGUSR1 makes the main process fail with ``RuntimeError: DataLoader worker ... is
killed by signal`` before it can save its checkpoint. ``WorkerInit``, the ``worker_init_fn`` of every
loader in ``tdd_lightning.data``, makes workers ignore those signals; the main process decides (it saves
and stops, then shuts its workers down). When Lightning seeds workers (``seed_everything(workers=True)``),
``WorkerInit`` does the same seeding Lightning would have added, so the random streams are unchanged.
tests/test_data_robustness.py sends ``os.killpg`` to a training run with two workers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class WorkerInit:
    """``worker_init_fn``: ignore ``WORKER_IGNORED_SIGNALS``, seed like Lightning, then call ``inner``.

    ``rank``: the global rank, for Lightning's per-rank worker seeds. Picklable (spawned workers).
    """

    def __init__(self, rank: int = 0, inner: Callable[[int], None] | None = None):
        self.rank, self.inner = rank, inner

    def __call__(self, worker_id: int) -> None:
        for signum in WORKER_IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if int(os.environ.get("PL_SEED_WORKERS", 0)):  # set by seed_everything(workers=True)
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)
        if self.inner is not None:
            self.inner(worker_id)
