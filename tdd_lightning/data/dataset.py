"""An iterable dataset over tar shards: disjoint shards per rank and worker, seeded, bad input skipped.

Two sample formats, chosen by the decoder:
- raw: an image (jpg/jpeg/png/webp) and a caption (txt/caption/text, or json with "caption"/"text"),
  preprocessed -> ``pixels`` [3, H, W] in [-1, 1], the geometry ``original_size`` [2] and
  ``crop_top_left`` [2], ``caption`` (the model family turns geometry into its condition, if any);
- cached (written by ``tdd_lightning.data.encode``): one safetensors blob with ``latents`` (fp16) and the
  condition tensors the model family declares, plus the caption -> all float32. Which tensors: the
  cache's ``meta.json`` list, else every tensor of the blob.
Every sample also carries its ``key`` (the tar member name without extension).

Bad samples are skipped and counted by reason (``SKIP_REASONS``): ``caption`` (none, not UTF-8, bad
json), ``empty_caption`` (only with ``empty_captions="skip"``), ``image``, ``cached`` (unreadable
tensors), ``nonfinite`` (NaN/Inf in a cached tensor), ``shape`` (a cached tensor of the wrong shape),
``shard``/``truncated`` (unreadable tar). Kept empty captions are counted apart (``notes``).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from itertools import islice

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tdd_lightning.data.preprocess import SDXLPreprocess
from tdd_lightning.data.shards import iter_tar_samples
from tdd_lightning.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption", "text")
CACHED_EXT = "safetensors"  # the member that holds a cached sample's tensors
SKIP_REASONS = ("shard", "truncated", "image", "caption", "cached", "nonfinite", "shape", "empty_caption")
NOTES = ("empty_caption_kept",)  # counted, not skipped
EMPTY_CAPTIONS = ("keep", "skip")  # keep: train on the empty caption (the default); skip: drop the sample
WARN_FIRST, WARN_EVERY = 10, 1000  # per worker: warn for the first skips, then every WARN_EVERY-th


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class NoValidSamplesError(UserError):
    """A pass over the shards produced no usable sample (a RuntimeError; reported in one line)."""


class SkipCounter:
    """Sample counts in shared memory: DataLoader workers write, the main process reads.

    One row per worker (no write races), one column per reason (``labels``, default ``SKIP_REASONS``).
    Counts accumulate over epochs.
    """

    def __init__(self, num_workers: int, labels: Sequence[str] = SKIP_REASONS):
        self.labels = tuple(labels)
        self.counts = torch.zeros(max(1, num_workers), len(self.labels), dtype=torch.int64).share_memory_()

    def add(self, reason: str) -> int:
        info = get_worker_info()
        row = self.counts[(info.id if info is not None else 0) % len(self.counts)]
        row[self.labels.index(reason)] += 1
        return int(row.sum())

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def count(self, reason: str) -> int:
        return int(self.counts[:, self.labels.index(reason)].sum())

    def by_reason(self) -> dict[str, int]:
        return {r: int(n) for r, n in zip(self.labels, self.counts.sum(0).tolist(), strict=True) if n}


def read_caption(sample: dict) -> str:
    """A sample's caption (stripped); ``SkipSample("caption")`` when there is none or it is unreadable."""
    for ext in CAPTION_EXTS:
        if ext in sample:
            try:
                return sample[ext].decode("utf-8").strip()
            except UnicodeDecodeError as exn:
                raise SkipSample("caption", f"the .{ext} caption is not UTF-8: {exn}") from None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError
            raise SkipSample("caption", f"unreadable json: {exn}") from None
        for field in ("caption", "text"):
            if isinstance(meta, dict) and isinstance(meta.get(field), str):
                return meta[field].strip()
    raise SkipSample("caption", "no caption (txt/caption/text member or json 'caption'/'text' field)")


class CaptionPolicy:
    """What to do with an empty caption: ``keep`` it (the dataset counts it) or ``skip`` the sample."""

    def __init__(self, empty_captions: str = "keep"):
        if empty_captions not in EMPTY_CAPTIONS:
            raise ValueError(f"empty_captions must be one of {EMPTY_CAPTIONS}, got {empty_captions!r}")
        self.empty_captions = empty_captions

    def caption(self, sample: dict) -> str:
        caption = read_caption(sample)
        if not caption and self.empty_captions == "skip":
            raise SkipSample("empty_caption", "empty caption (empty_captions=skip)")
        return caption


class RawDecoder(CaptionPolicy):
    """Raw sample -> ``pixels``, ``original_size``, ``crop_top_left``, ``caption``."""

    def __init__(self, preprocess: SDXLPreprocess, empty_captions: str = "keep"):
        super().__init__(empty_captions)
        self.preprocess = preprocess

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        from PIL import Image

        caption = self.caption(sample)
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise SkipSample("image", f"no image member ({'/'.join(IMAGE_EXTS)})")
        try:
            with Image.open(io.BytesIO(sample[ext])) as image:
                image.load()
                pixels, geometry = self.preprocess(image, rng)
        except Exception as exn:
            raise SkipSample("image", f"undecodable {ext}: {exn!r}") from exn
        return {"pixels": pixels, **geometry, "caption": caption}


class CachedDecoder(CaptionPolicy):
    """Cached sample -> its named tensors (``latents`` and the family's condition tensors), float32.

    ``keys``: the tensors to read (a sample without one is skipped, reason ``cached``); None: every
    tensor of the blob. ``shapes``: the expected shape per key; a key not given takes the shape of this
    reader's first sample. A tensor of another shape (reason ``shape``) or with a NaN/Inf value
    (``nonfinite``) is skipped, so that neither a collate error nor a non-finite step can follow.
    """

    def __init__(
        self,
        shapes: dict[str, Sequence[int]] | None = None,
        empty_captions: str = "keep",
        keys: Sequence[str] | None = None,
    ):
        super().__init__(empty_captions)
        self.shapes = {k: tuple(v) for k, v in (shapes or {}).items()}
        self.keys = None if keys is None else tuple(keys)

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        from safetensors.torch import load

        caption = self.caption(sample)
        if CACHED_EXT not in sample:
            raise SkipSample("cached", f"no .{CACHED_EXT} member")
        try:
            tensors = load(sample[CACHED_EXT])
            out = {k: tensors[k].float() for k in (self.keys or tensors)}
        except Exception as exn:
            raise SkipSample("cached", f"unreadable cached tensors: {exn!r}") from exn
        for k in out:
            want = self.shapes.setdefault(k, tuple(out[k].shape))
            if tuple(out[k].shape) != want:
                raise SkipSample("shape", f"{k} has shape {list(out[k].shape)}, expected {list(want)}")
            if not torch.isfinite(out[k]).all():
                raise SkipSample("nonfinite", f"{k} holds NaN or Inf values")
        out["caption"] = caption
        return out


def shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Approximate shuffle through a buffer of ``bufsize`` items (0 or 1: no shuffle)."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Samples from tar shards, split so that every (rank, worker) reads its own disjoint shards.

    Each epoch the shard list is permuted with a seed shared by all ranks (``seed``, epoch), then
    reader i = rank * num_workers + worker takes shards i, i + R*W, ... Sample-level shuffling and the
    random crop/flip use a generator seeded by (seed, epoch, rank, worker).

    ``resampled``: repeat shuffled passes over the reader's own shards without end; an epoch is then
    ``samples_per_epoch`` samples over all ranks, ``samples_per_epoch // world_size`` on each (None:
    never ends). Without it, one pass per epoch, optionally capped at ``samples_per_epoch``.
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: RawDecoder | CachedDecoder,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        return_url: bool = False,
    ):
        super().__init__()
        if not shards:
            raise ValueError("ShardDataset needs at least one shard")
        if len(shards) < world_size:
            raise ValueError(
                f"{len(shards)} shard(s) cannot be split over {world_size} ranks: write more shards"
            )
        self.shards = list(shards)
        self.decoder = decoder
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer if shuffle else 0
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.return_url = return_url  # add each sample's shard as ``url`` (the offline cache needs it)
        self.skips = SkipCounter(num_workers)
        self.notes = SkipCounter(num_workers, NOTES)  # kept samples worth counting (empty captions)
        self.epoch = 0  # advanced by each __iter__ (in whichever process runs it) and by the loader
        self.stream = 0  # mixed into every seed; the datamodule sets the global step, so a resume draws anew

    def reader_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """The shards that (this rank, ``worker``) reads in ``epoch``: disjoint across readers."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"shards-{self.seed}-{self.stream}-{epoch}").shuffle(order)
        reader, readers = self.rank * num_workers + worker, self.world_size * num_workers
        return order[reader::readers]

    def reader_quota(self, worker: int, num_workers: int) -> int | None:
        """How many samples this reader yields per epoch (None: all it has, or forever if resampled)."""
        if self.samples_per_epoch is None:
            return None
        per_rank = self.samples_per_epoch // self.world_size  # equal on every rank (DDP needs that)
        return per_rank // num_workers + (worker < per_rank % num_workers)

    def _skip(self, reason: str, url: str, message: str) -> None:
        n = self.skips.add(reason)
        if n <= WARN_FIRST or n % WARN_EVERY == 0:
            log.warning("skipped sample (%s) in %s: %s [%d skipped by this reader]", reason, url, message, n)

    def _decoded(self, shards: list[str], rng: random.Random) -> Iterator[dict]:
        raw = (s for url in shards for s in iter_tar_samples(url, self._skip))
        for sample in shuffled(raw, self.shuffle_buffer, rng):
            try:
                out = self.decoder(sample, rng)
            except SkipSample as skip:
                self._skip(skip.reason, sample["__url__"], f"{sample['__key__']}: {skip}")
                continue
            except Exception as exn:  # anything unforeseen in one sample must not stop training
                self._skip("image", sample["__url__"], f"{sample['__key__']}: {exn!r}")
                continue
            if out["caption"] == "":
                self.notes.add("empty_caption_kept")
            out["key"] = sample["__key__"]
            if self.return_url:
                out["url"] = sample["__url__"]
            yield out

    def _stream(self, shards: list[str], rng: random.Random) -> Iterator[dict]:
        while True:
            order = list(shards)
            if self.resampled:
                rng.shuffle(order)
            good = 0
            for sample in self._decoded(order, rng):
                good += 1
                yield sample
            if not self.resampled:
                return
            if good == 0:  # a full pass gave nothing: stop this reader rather than spin forever
                log.warning(
                    "a full pass over %d shard(s) gave no valid sample; this reader stops", len(order)
                )
                return

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = random.Random(f"samples-{self.seed}-{self.stream}-{epoch}-{self.rank}-{worker}")
        shards = self.reader_shards(epoch, worker, num_workers)
        if not shards:
            return iter(())
        return islice(self._stream(shards, rng), self.reader_quota(worker, num_workers))


def collate(samples: list[dict]) -> dict:
    """Stack tensors along a new batch dim; other values (captions, keys) become lists."""
    return {
        k: torch.stack([s[k] for s in samples])
        if isinstance(samples[0][k], torch.Tensor)
        else [s[k] for s in samples]
        for k in samples[0]
    }
