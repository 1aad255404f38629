"""The data position that a checkpoint stores: what training has consumed, per rank and reader.

Every batch of a ``ShardDataset`` carries ``_position`` (its epoch, the reader that made it, the reader's
place after it). The data module hands each batch's tag to ``StreamState.consumed`` as the training loop
takes it (``on_before_batch_transfer``, so batches prefetched by workers or by Lightning do not count);
with several ranks the tags of all ranks are gathered at that step, so that rank 0's checkpoint holds
every rank's place. A resume gives each reader its state back and starts with the reader after the last
one consumed (DataLoader workers take turns), which continues the stream exactly.

A checkpoint written with another number of ranks or workers cannot continue exactly (the shards are
split over readers differently): the data then starts the next epoch afresh, and says so at start-up.
"""

from __future__ import annotations

from tdd_lightning.data.ranks import gather_objects

VERSION = 1


class StreamState:
    def __init__(self, world_size: int, num_workers: int, batch_size: int, layout: str):
        self.world_size, self.num_workers, self.batch_size, self.layout = (
            world_size,
            num_workers,
            batch_size,
            layout,
        )
        self.epoch: int | None = None
        self.readers: dict[int, dict[int, dict]] = {}  # rank -> reader -> state after its latest batch
        self.last: dict[int, int] = {}  # rank -> the reader of its latest batch

    def consumed(self, tag: dict | None) -> None:
        """Record the batch the training loop takes now (every rank calls it at every step)."""
        tags = gather_objects(tag) if self.world_size > 1 else [tag]
        for rank, t in enumerate(tags):
            if t is None:
                continue
            if t["epoch"] != self.epoch:
                self.epoch, self.readers, self.last = t["epoch"], {}, {}
            self.readers.setdefault(rank, {})[t["reader"]] = t["state"]
            self.last[rank] = t["reader"]

    def state_dict(self) -> dict:
        return {
            "version": VERSION,
            "epoch": self.epoch,
            "readers": self.readers,
            "last": self.last,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "layout": self.layout,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.readers, self.last = state["epoch"], state["readers"], state["last"]


def resume_plan(saved: dict | None, rank: int, now: StreamState) -> tuple[int, dict, int, str | None]:
    """(epoch, reader states, first reader, message) for the first iteration after a restore.

    Exact when the checkpoint's ranks, workers and data layout equal this run's; else the next epoch
    from its start, with a message saying so (the caller prints it)."""
    if not saved or saved.get("epoch") is None:
        return 0, {}, 0, None
    epoch = saved["epoch"]
    was = (saved["world_size"], max(1, saved["num_workers"]), saved["layout"])
    if was != (now.world_size, max(1, now.num_workers), now.layout):
        what = []
        if was[:2] != (now.world_size, max(1, now.num_workers)):
            what.append(
                f"{saved['world_size']} rank(s) x {saved['num_workers']} worker(s), this run "
                f"{now.world_size} x {now.num_workers}"
            )
        if was[2] != now.layout:
            what.append(f"data layout {saved['layout']!r}, this run {now.layout!r}")
        message = (
            f"data position: the checkpoint was written with {'; '.join(what)}: the shards are split over "
            f"readers differently, so the data cannot continue epoch {epoch} exactly; it starts epoch "
            f"{epoch + 1} afresh (the rest of epoch {epoch} is not seen). Resume with the same ranks and "
            "data.num_workers to continue exactly."
        )
        return epoch + 1, {}, 0, message
    readers = saved["readers"].get(rank, {})
    first = (saved["last"][rank] + 1) % max(1, now.num_workers) if rank in saved["last"] else 0
    message = None
    if saved.get("batch_size") != now.batch_size:
        message = (
            f"data position: the checkpoint used batch size {saved.get('batch_size')}, this run "
            f"{now.batch_size}: every reader continues its sample stream where it was, in batches of the "
            "new size"
        )
    return epoch, readers, first, message
