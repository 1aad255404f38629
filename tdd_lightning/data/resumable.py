"""A DataLoader that resumes mid-epoch exactly and splits global batches across ranks.

Epoch e visits randperm(n) drawn from (seed + e). Global batch k is positions [k W B, (k + 1) W B) of
that order; rank r takes its B-slice [k W B + r B, k W B + (r + 1) B). So W ranks with batch B see
exactly what one process with batch W B sees, in the same order (the module's randomness is sliced
the same way). Lightning saves ``state_dict()`` of any loader that has one into the checkpoint and
restores it on resume; the position is counted in the main process as batches are handed to the
training loop (worker prefetching does not count).

The loader is one endless stream of global batches: epoch 0's, then epoch 1's, ... Each ``iter()``
continues where the last one stopped (Lightning stops at ``len()`` batches and never exhausts an
iterator; after a resume its idea of an epoch may be shorter than ours), and ``len()`` is what is left
of the current epoch (a whole epoch when the current one is done). So batch k of the run is the same
whether the run was resumed or not, at an epoch end or in the middle of one. tests/test_robustness.py
checks 20+ resumed steps, loss by loss, against an uninterrupted run (resumed at an epoch end and
mid-epoch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tdd_lightning.data.workers import WorkerInit


class GlobalBatchSampler(Sampler[int]):
    """This rank's indices, epoch by epoch, starting after ``start_batch`` global batches (resume)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < batch_size * world_size:
            raise ValueError(
                f"the dataset has {n} samples, fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.n, self.B, self.seed, self.rank, self.W = n, batch_size, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.B * self.W)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for k in range(self.start_batch, self.batches_per_epoch):
            first = k * self.B * self.W + self.rank * self.B
            yield from order[first : first + self.B]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.B


class ResumableLoader(DataLoader):
    """Loader over ``GlobalBatchSampler``; ``state_dict``/``load_state_dict`` give exact resume.

    ``epoch`` and ``position`` (batches of that epoch handed out) are the stream's place; workers ignore
    the job's signals (``WorkerInit``).
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, **kwargs
    ):
        self.order = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size)
        kwargs["worker_init_fn"] = WorkerInit(rank, kwargs.get("worker_init_fn"))
        super().__init__(dataset, batch_size=batch_size, sampler=self.order, drop_last=True, **kwargs)
        self.epoch, self.position = 0, 0

    def _next_epoch_if_done(self) -> None:
        if self.position >= self.order.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        """Batches left in the current epoch (all of the next one if the current one is done)."""
        left = self.order.batches_per_epoch - self.position
        return left if left > 0 else self.order.batches_per_epoch

    def __iter__(self):
        self._next_epoch_if_done()
        self.order.epoch, self.order.start_batch = self.epoch, self.position
        for batch in super().__iter__():
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.position,
            "batch_size": self.batch_size,
            "world_size": self.order.W,
        }

    def load_state_dict(self, state: dict) -> None:
        was = (state.get("batch_size"), state.get("world_size", 1))
        if was != (self.batch_size, self.order.W):
            raise ValueError(
                "cannot resume the data position: the run used batch_size x world_size = "
                f"{was[0]} x {was[1]}, "
                f"this one {self.batch_size} x {self.order.W}"
            )
        self.epoch, self.position = state["epoch"], state["batches"]
