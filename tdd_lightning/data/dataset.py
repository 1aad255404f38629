"""An iterable dataset over tar shards: disjoint shards per rank and worker, seeded, bad input skipped.

Two sample formats, chosen by the decoder:
- raw: an image (jpg/jpeg/png/webp) and a caption (txt/caption/text, or json with "caption"/"text"),
  preprocessed -> ``pixels`` [3, H, W] in [-1, 1], the geometry ``original_size`` [2] and
  ``crop_top_left`` [2], ``caption`` (the model family turns geometry into its condition, if any;
  optionally filtered on the json metadata: ``tdd_lightning.data.filters``);
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
from dataclasses import dataclass
from itertools import islice

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tdd_lightning.data.buckets import bucket_of_batch
from tdd_lightning.data.filters import SampleFilter
from tdd_lightning.data.position import Position, batches_of, draw, permuted, reader_samples
from tdd_lightning.data.preprocess import SDXLPreprocess
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


def read_metadata(sample: dict) -> dict:
    """The sample's json metadata ({} when there is none or it does not parse to an object)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


class RawDecoder(CaptionPolicy):
    """Raw sample -> ``pixels``, ``original_size``, ``crop_top_left``, ``caption`` (preprocessing).

    ``sample_filter``: LAION-style filters (``tdd_lightning.data.filters``); a sample that fails one is
    skipped with that filter's reason, judged before the image is decoded when the metadata suffices."""

    def __init__(
        self,
        preprocess: SDXLPreprocess,
        empty_captions: str = "keep",
        sample_filter: SampleFilter | None = None,
    ):
        super().__init__(empty_captions)
        self.preprocess = preprocess
        self.filter = sample_filter if sample_filter is not None and sample_filter.active else None

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        from PIL import Image

        meta = read_metadata(sample) if self.filter else None
        if self.filter and (reason := self.filter.check_metadata(meta)):
            raise SkipSample(reason, f"filtered out ({reason})")
        caption = self.caption(sample)
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise SkipSample("image", f"no image member ({'/'.join(IMAGE_EXTS)})")
        try:
            with Image.open(io.BytesIO(sample[ext])) as image:
                if self.filter and (reason := self.filter.check_size(meta, image.height, image.width)):
                    raise SkipSample(reason, f"filtered out ({reason}: {image.height} x {image.width})")
                image.load()
                out = self.preprocess(image, rng)
        except SkipSample:
            raise
        except Exception as exn:
            raise SkipSample("image", f"undecodable {ext}: {exn!r}") from exn
        return {**out, "caption": caption}


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


@dataclass
class Source:
    """One family of streams: the whole data set, or one aspect-ratio bucket of a bucketed cache.

    ``size``: its sample count (the bucket sampling weight; 0 when unknown, single source only)."""

    name: str
    shards: list[str]
    decoder: RawDecoder | CachedDecoder
    size: int = 0


class ShardDataset(IterableDataset):
    """Batches (or samples) from tar shards; every (rank, worker) reads its own shards, resumably.

    Each epoch a source's shard list is permuted with a seed shared by all ranks (``seed``, epoch), then
    reader i = rank * num_workers + worker takes shards i, i + R*W, ... Inside a reader the order is the
    seekable one of ``tdd_lightning.data.position`` (``shuffle_shards`` shards interleaved, windows of
    ``shuffle_buffer`` samples permuted); random crops and flips are drawn per sample from
    (seed, epoch, pass, shard, key). So everything a reader yields is a pure function of its place.

    Two ways to end an epoch:
    - one pass (not ``resampled``, one source): each reader yields its shards once, then stops;
    - counted (``resampled``, or several sources = buckets): every stream repeats passes without end;
      the rank's batch n (n = worker, worker + W, ...) is drawn from source ``bucket_of_batch(n)`` (the
      same on every rank) and an epoch is ``samples_per_epoch // world_size // batch_size`` batches per
      rank (None: never ends; with buckets the default is the sources' total size). A source with fewer
      shards than readers is shared: reader i reads its shard i mod n.

    With ``batch_size`` every item is a collated batch with ``_position`` = {epoch, reader, state}: the
    reader's place after it, which the data module records as training consumes the batch and hands
    back (``resume``, ``shift``) to continue exactly after a restart. Without it, samples (the encoder).
    """

    def __init__(
        self,
        shards: Sequence[str],
        decoder: RawDecoder | CachedDecoder,
        *,
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        shuffle_shards: int = 4,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        batch_size: int | None = None,
        drop_last: bool = False,
        return_url: bool = False,
        sources: Sequence[Source] | None = None,
        skip_reasons: Sequence[str] = SKIP_REASONS,
    ):
        super().__init__()
        self.sources = list(sources) if sources else [Source("all", list(shards), decoder)]
        self.shards = [u for src in self.sources for u in src.shards]
        if not self.shards:
            raise ValueError("ShardDataset needs at least one shard")
        self.counted = resampled or len(self.sources) > 1
        if not self.counted and len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} shard(s) cannot be split over {world_size} ranks: write more shards"
            )
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.shuffle_shards = max(1, shuffle_shards) if shuffle and shuffle_buffer else 1
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size, self.drop_last = batch_size, drop_last
        self.return_url = return_url  # add each sample's shard as ``url`` (the offline cache needs it)
        self.skips = SkipCounter(num_workers, skip_reasons)
        self.notes = SkipCounter(num_workers, NOTES)  # kept samples worth counting (empty captions)
        self.epoch = 0  # set by the loader before each iteration
        self.next_epoch = 0  # the epoch a new loader starts with (advanced by each loader pass)
        self.resume: dict[int, dict] = {}  # reader -> its state to continue from (this epoch only)
        self.shift = 0  # DataLoader worker w plays reader (w + shift) % W: the next reader goes first

    # ---- the plan of an epoch ----------------------------------------------------------------------
    def reader_shards(self, epoch: int, worker: int, num_workers: int, source: Source | None = None) -> list:
        """The shards that (this rank, ``worker``) reads of ``source`` in ``epoch``."""
        source = source or self.sources[0]
        order = permuted(source.shards, "shards", self.seed, epoch) if self.shuffle else list(source.shards)
        reader, readers = self.rank * num_workers + worker, self.world_size * num_workers
        if self.counted and len(order) < readers:
            return [order[reader % len(order)]]
        return order[reader::readers]

    def batches_per_rank(self) -> int | None:
        """Batches per rank and epoch in counted mode (None: endless)."""
        total = self.samples_per_epoch
        if total is None and len(self.sources) > 1:
            total = sum(src.size for src in self.sources)
        if total is None:
            return None
        return total // self.world_size // self.batch_size

    # ---- reading -----------------------------------------------------------------------------------
    def _skip(self, reason: str, url: str, message: str) -> None:
        n = self.skips.add(reason)
        if n <= WARN_FIRST or n % WARN_EVERY == 0:
            log.warning("skipped sample (%s) in %s: %s [%d skipped by this reader]", reason, url, message, n)

    def _decoded(self, source: Source, reader: int, epoch: int, worker: int, num_workers: int, start):
        """(decoded sample, position after it) of one reader's stream of ``source``."""
        key = ("samples", self.seed, epoch, reader, self.world_size * num_workers, source.name)
        raw = reader_samples(
            self.reader_shards(epoch, worker, num_workers, source),
            key,
            block_shards=self.shuffle_shards,
            window=self.shuffle_buffer,
            resampled=self.counted,
            shuffle=self.shuffle,
            start=Position.from_dict(start),
            on_error=self._skip,
        )
        good_pass = None  # the latest pass with a valid sample (the first counts as one)
        for sample, pos in raw:
            if good_pass is None:
                good_pass = pos.pass_
            url = sample["__url__"]
            rng = random.Random(
                draw("crop", self.seed, epoch, pos.pass_, url.rsplit("/", 1)[-1], sample["__key__"])
            )
            try:
                out = source.decoder(sample, rng)
            except SkipSample as skip:
                self._skip(skip.reason, url, f"{sample['__key__']}: {skip}")
                out = None
            except Exception as exn:  # anything unforeseen in one sample must not stop training
                self._skip("image", url, f"{sample['__key__']}: {exn!r}")
                out = None
            if out is None:
                if pos.pass_ > good_pass + 1:
                    log.warning("a full pass over %s gave no valid sample; this reader stops", source.name)
                    return
                continue
            good_pass = pos.pass_
            if out["caption"] == "":
                self.notes.add("empty_caption_kept")
            out["key"] = sample["__key__"]
            if self.return_url:
                out["url"] = url
            yield out, pos

    def _tagged(self, batch: dict, epoch: int, reader: int, state: dict) -> dict:
        batch["_position"] = {"epoch": epoch, "reader": reader, "state": state}
        return batch

    def _one_pass(self, reader: int, epoch: int, worker: int, nw: int, state: dict) -> Iterator[dict]:
        source = self.sources[0]
        samples = self._decoded(source, reader, epoch, worker, nw, state.get("streams", {}).get(source.name))
        if self.batch_size is None:
            yield from (s for s, _ in samples)
            return
        for batch, pos in batches_of(samples, self.batch_size, self.drop_last, collate):
            yield self._tagged(batch, epoch, worker, {"streams": {source.name: pos.to_dict()}})

    def _counted(self, reader: int, epoch: int, worker: int, nw: int, state: dict) -> Iterator[dict]:
        last = self.batches_per_rank()
        sizes = [src.size for src in self.sources]
        positions = dict(state.get("streams", {}))
        streams: dict[str, Iterator] = {}
        n = state.get("n", worker)
        while last is None or n < last:
            i = bucket_of_batch(self.seed, epoch, n, sizes) if len(self.sources) > 1 else 0
            src = self.sources[i]
            if src.name not in streams:
                streams[src.name] = self._decoded(src, reader, epoch, worker, nw, positions.get(src.name))
            got = list(islice(streams[src.name], self.batch_size))
            if len(got) < self.batch_size:
                log.warning("the stream of %s ended (no valid sample left); this reader stops", src.name)
                return
            positions[src.name] = got[-1][1].to_dict()
            n += nw
            yield self._tagged(
                collate([s for s, _ in got]), epoch, worker, {"n": n, "streams": dict(positions)}
            )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (w + self.shift) % nw  # the reader this process plays
        reader, epoch = self.rank * nw + worker, self.epoch
        state = self.resume.get(worker, {})
        # a persistent worker keeps this copy: its next pass is the next epoch, from its start
        self.epoch, self.resume, self.shift = epoch + 1, {}, 0
        if self.counted and self.batch_size is not None:
            return self._counted(reader, epoch, worker, nw, state)
        return self._one_pass(reader, epoch, worker, nw, state)


def collate(samples: list[dict]) -> dict:
    """Stack tensors along a new batch dim; other values (captions, keys) become lists."""
    return {
        k: torch.stack([s[k] for s in samples])
        if isinstance(samples[0][k], torch.Tensor)
        else [s[k] for s in samples]
        for k in samples[0]
    }
