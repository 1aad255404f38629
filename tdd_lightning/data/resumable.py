"""A DataLoader that resumes mid-epoch exactly: per-epoch permutations from (seed, epoch), plus position.

Lightning saves ``state_dict()`` of any loader that has one into the checkpoint and restores it on
resume, so the run continues with the very batch it would have seen next. The position is counted in
the main process as batches are handed to the training loop (worker prefetching does not count);
tests/test_train_cli.py checks the resumed losses step by step against an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochPermutation(Sampler[int]):
    """Sampler: epoch e visits randperm(n) drawn from seed + e, starting at ``start`` (resume)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        yield from order[self.start :]

    def __len__(self) -> int:
        return self.n - self.start


class ResumableLoader(DataLoader):
    """Shuffles with EpochPermutation (drop_last); ``state_dict``/``load_state_dict`` give exact resume."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, **kwargs):
        self.perm = EpochPermutation(len(dataset), seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self.perm, drop_last=True, **kwargs)
        self._consumed = 0  # batches handed out in the current epoch (counting the resumed-from start)

    def __iter__(self):
        start_batches = self.perm.start // self.batch_size
        self._consumed = start_batches
        for batch in super().__iter__():
            self._consumed += 1
            yield batch
        # epoch finished: next epoch starts from its beginning with a new permutation
        self.perm.epoch += 1
        self.perm.start = 0
        self._consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.perm.epoch, "batches": self._consumed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"cannot resume the data position: batch_size was {state.get('batch_size')}, "
                f"now {self.batch_size}"
            )
        self.perm.epoch, self.perm.start = state["epoch"], state["batches"] * self.batch_size
