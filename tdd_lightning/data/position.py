"""A reader's sample order as a seekable position: exact mid-epoch resume without replaying the stream.

One reader (a rank's DataLoader worker) owns a list of shards for the epoch. Its order:
- a pass permutes its shard list (resampled mode: every pass anew) and cuts it into blocks of
  ``block_shards`` consecutive shards;
- inside a block the shards' streams are interleaved: step t takes the next sample of the open stream
  ``draw(key, pass, block, t) % n_open`` (a stream that ends is closed and the step drawn again);
- each stream reads its shard in windows of ``window`` consecutive samples, each window permuted by
  ``draw(key, shard, window index)``.

Every choice is a pure function of the reader's key and counters, so the place after any sample is the
small ``Position`` (pass, block, t, samples taken from each stream of the block, the closed ones). A
resume opens only the current block's shards and skips the samples already taken by reading tar headers
(a seek per member on a local shard, no decode): the shards before the block are not opened at all.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

from tdd_lightning.data.shards import ErrorCallback, iter_tar_samples


def draw(*parts) -> int:
    """A 64-bit integer, a pure function of ``parts`` (stable across processes and Python runs)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def permuted(items: Sequence, *parts) -> list:
    """``items`` in an order drawn from ``parts``."""
    out = list(items)
    random.Random(draw(*parts)).shuffle(out)
    return out


@dataclass
class Position:
    """Where a reader stands in its epoch: after ``t`` samples of block ``block`` of pass ``pass_``."""

    pass_: int = 0
    block: int = 0
    t: int = 0
    taken: list[int] = field(default_factory=list)  # samples taken from each stream of the block
    closed: list[bool] = field(default_factory=list)  # streams found at their end

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Position:
        return cls(**d) if d else cls()


class WindowStream:
    """One shard's samples from ``start`` on, in windows of ``window`` permuted by ``key``."""

    def __init__(self, url: str, window: int, key: tuple, start: int, on_error: ErrorCallback):
        self.window = max(1, window)
        self.key, self.url = key, url
        first = start - start % self.window
        self.samples = iter_tar_samples(url, on_error, skip=first)
        self.index, self.buf, self.at = first // self.window, [], start % self.window
        self._fill(start % self.window)

    def _fill(self, at: int) -> None:
        buf = [s for _, s in zip(range(self.window), self.samples, strict=False)]
        # the shard's file name, not its path: the order must not depend on where the data lives
        name = self.url.rsplit("/", 1)[-1]
        self.buf = buf if self.window == 1 else permuted(buf, *self.key, name, self.index)
        self.at = at

    def next(self) -> dict | None:
        if self.at >= len(self.buf):
            if len(self.buf) < self.window:
                return None  # the last window was short: the shard has ended
            self.index += 1
            self._fill(0)
            if not self.buf:
                return None
        sample = self.buf[self.at]
        self.at += 1
        return sample


def reader_samples(
    shards: Sequence[str],
    key: tuple,
    *,
    block_shards: int,
    window: int,
    resampled: bool,
    shuffle: bool,
    start: Position | None,
    on_error: ErrorCallback,
) -> Iterator[tuple[dict, Position]]:
    """Yield (raw sample, the position after it) from ``start`` on; without ``resampled``, one pass."""
    pos = start or Position()
    p = pos.pass_
    while True:
        order = permuted(shards, *key, "pass", p) if (shuffle and (resampled or p > 0)) else list(shards)
        blocks = [order[i : i + block_shards] for i in range(0, len(order), max(1, block_shards))]
        first_block = pos.block if p == pos.pass_ else 0
        good = 0
        for b in range(first_block, len(blocks)):
            resume = p == pos.pass_ and b == pos.block and pos.taken
            taken = list(pos.taken) if resume else [0] * len(blocks[b])
            closed = list(pos.closed) if resume else [False] * len(blocks[b])
            t = pos.t if resume else 0
            streams = [
                None if closed[i] else WindowStream(url, window if shuffle else 1, key, taken[i], on_error)
                for i, url in enumerate(blocks[b])
            ]
            while True:
                live = [i for i, c in enumerate(closed) if not c]
                if not live:
                    break
                i = live[draw(*key, p, b, t) % len(live)] if shuffle else live[0]
                sample = streams[i].next()
                if sample is None:
                    closed[i], streams[i] = True, None
                    continue
                taken[i] += 1
                t += 1
                good += 1
                yield sample, Position(p, b, t, list(taken), list(closed))
        fresh = not (p == pos.pass_ and (pos.block or pos.taken))
        if not resampled or (good == 0 and fresh):  # a whole pass of nothing: stop rather than spin
            return
        p += 1


def batches_of(
    items: Iterator, batch_size: int, drop_last: bool, collate: Callable[[list], dict]
) -> Iterator[tuple[dict, object]]:
    """Group (sample, tag) pairs into (batch, tag of its last sample)."""
    buf, tag = [], None
    for sample, tag in items:
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate(buf), tag
            buf = []
    if buf and not drop_last:
        yield collate(buf), tag
