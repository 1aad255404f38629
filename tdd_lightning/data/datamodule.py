"""The LightningDataModule over webdataset tar shards, raw images or the offline cache.

- ``mode="raw"``: batches of ``pixels`` [B, 3, H, W] in [-1, 1], the geometry ``original_size`` [B, 2]
  and ``crop_top_left`` [B, 2], ``caption``; the LightningModule's family encoder turns them into its
  condition (VAE + text encoders) on the fly. LAION-style filters (``min_size``, ``min_aesthetic``,
  ``max_watermark``, ``max_nsfw``, ``filters``) skip samples.
- ``mode="cached"``: batches of ``latents``, the condition tensors of the model family that wrote the
  cache (the names in its ``meta.json``, else every tensor of a sample) and ``caption``, read from
  shards written by ``python -m tdd_lightning.data.encode``; no VAE or text encoder is loaded.
  ``uncond`` then holds the encoded empty prompt (its text tensors) from ``uncond.safetensors``. A
  bucketed cache (one folder of shards per aspect-ratio bucket) gives batches of one bucket each, the
  same on every rank.
The data position is exact across a restart: the module records what training consumed
(``tdd_lightning.data.stream_state``) and its ``state_dict`` goes into every checkpoint.
Every batch also has ``key`` (the sample names). Bad samples are skipped with a warning and counted in
``skipped``, by reason in ``skipped_by_reason()`` (log them with ``SkippedSamplesLogger``); a pass that
yields no batch at all is an error. A missing shard or a pattern that matches none is a ``ConfigError``
naming ``train_shards`` when the module is built, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from tdd_lightning.data.buckets import bucket_of_name, parse_buckets
from tdd_lightning.data.dataset import (
    EMPTY_CAPTIONS,
    SKIP_REASONS,
    CachedDecoder,
    NoValidSamplesError,
    RawDecoder,
    ShardDataset,
    Source,
)
from tdd_lightning.data.filters import SampleFilter
from tdd_lightning.data.preprocess import SDXLPreprocess
from tdd_lightning.data.ranks import rank_and_world
from tdd_lightning.data.shards import (
    ShardNotFoundError,
    check_shards_exist,
    expand_shards,
    is_url,
    open_shard,
)
from tdd_lightning.data.stream_state import StreamState, resume_plan
from tdd_lightning.data.workers import WorkerInit
from tdd_lightning.errors import ConfigError, UserError

UNCOND_FILE = "uncond.safetensors"  # written by the offline cache next to its shards
META_FILE = "meta.json"  # idem: settings and shapes (the latent shape checks every cached sample)
MODES = ("raw", "cached")
log = logging.getLogger(__name__)


class UncondNotFoundError(UserError, FileNotFoundError):
    """The cache's encoded empty prompt is missing: reported in one line naming ``data.uncond_path``."""


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard list of ``spec`` (expanded, absolute, every local one existing), or a ConfigError."""
    try:
        shards = expand_shards(spec)
        check_shards_exist(shards)
    except ShardNotFoundError as e:
        shown = spec if isinstance(spec, str) else [str(s) for s in spec]
        if len(shown) > 3 and not isinstance(spec, str):
            shown = [*shown[:2], f"... ({len(shown)} in all)"]
        raise ConfigError("train_shards", shown, str(e)) from None
    return shards


def _beside(shard: str, name: str) -> str:
    return shard[: shard.rfind("/") + 1] + name


def _as_is(item):
    return item  # the dataset yields whole batches


class ShardLoader(DataLoader):
    """A DataLoader over a ShardDataset's batches: sets the dataset's epoch (and, once after a restore,
    the readers' places) before each pass, and refuses a pass with no batch.

    Each batch's ``_position`` tag is taken off it and queued in ``tags``, in the order the batches are
    handed out; the data module takes the oldest as the training loop consumes a batch."""

    def __init__(self, dataset: ShardDataset, *, epoch: int = 0, resume=None, **kwargs):
        super().__init__(dataset, batch_size=None, collate_fn=_as_is, **kwargs)
        self.next_epoch = epoch
        self.pending = resume  # (reader states, first reader) for the first pass, or None
        self.tags: deque = deque(maxlen=64)  # handed out, not yet consumed (prefetch depth is 1 or 2)

    def __iter__(self):
        ds = self.dataset
        ds.epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        ds.next_epoch = self.next_epoch  # where a new loader over this dataset starts
        resumed = self.pending is not None
        ds.resume, ds.shift = self.pending if resumed else ({}, 0)
        self.pending = None
        batches = 0
        self.tags.clear()
        for batch in super().__iter__():
            batches += 1
            self.tags.append(batch.pop("_position", None))
            yield batch
        if batches == 0 and not resumed:  # a restored place at an epoch's end gives no batch: fine
            raise NoValidSamplesError(
                f"no batch from {len(ds.shards)} shard(s) ({ds.shards[0]}, ...): "
                f"{ds.skips.total} sample(s) skipped so far {ds.skips.by_reason()}; see the warnings above"
                + (" (drop_last drops a worker's last partial batch)" if ds.drop_last else "")
            )


def find_meta(first_shard: str) -> dict | None:
    """The cache's ``meta.json``: beside ``first_shard``, or one folder up when that one is a bucketed
    cache's and the shard's folder one of its buckets."""
    for where in (first_shard, first_shard[: first_shard.rfind("/")]):
        path = _beside(where, META_FILE)
        if not is_url(path) and os.path.isfile(path):
            with open(path) as f:
                meta = json.load(f)
            if where == first_shard or _parent_name(first_shard) in (meta.get("buckets") or {}):
                return meta
    return None


def cached_latent_shape(first_shard: str) -> list[int] | None:
    """The latent shape recorded in the cache's ``meta.json`` beside ``first_shard`` (None: no meta.json)."""
    shape = (find_meta(first_shard) or {}).get("latent_shape")
    return list(shape) if shape else None


def _parent_name(shard: str) -> str:
    return shard.rstrip("/").rsplit("/", 2)[-2] if shard.count("/") >= 1 else ""


def load_uncond(path: str) -> dict[str, torch.Tensor]:
    """The encoded empty prompt: each text tensor of the file (the family's, e.g. ``prompt_embeds`` [77, D]),
    float32."""
    from safetensors.torch import load

    if not is_url(path) and not os.path.isfile(path):
        raise UncondNotFoundError(
            f"data.uncond_path: unconditional embeddings not found: {path} (written by "
            "python -m tdd_lightning.data.encode beside its shards)"
        )
    with open_shard(path) as f:
        tensors = load(f.read())
    return {k: v.float() for k, v in tensors.items()}


class ShardDataModule(L.LightningDataModule):
    """Webdataset shards -> raw or cached-format batches.

    Args:
        train_shards: brace-expandable string (``data/x-{000000..000009}.tar``), glob, URL, or a list.
        mode: ``raw`` (images + captions) or ``cached`` (output of ``tdd_lightning.data.encode``).
        batch_size: per rank.
        num_workers: DataLoader worker processes per rank.
        resolution: raw mode: target size, int or [height, width].
        center_crop: raw mode: centre crop (else random crop).
        random_flip: raw mode: horizontal flip with probability 1/2.
        resampled: repeat passes without end; an epoch is ``samples_per_epoch`` samples.
        samples_per_epoch: samples per epoch over all ranks (None: one pass, or endless if resampled).
        seed: seeds the shard order (shared by ranks), each reader's sample order and the crops.
        pin_memory: DataLoader pin_memory.
        shuffle_buffer: each shard is read in windows of this many samples, each window shuffled
            (0: no sample shuffle at all).
        shuffle_shards: shards interleaved at random by each reader (with ``shuffle_buffer`` > 0).
        drop_last: drop each worker's last partial batch.
        persistent_workers: keep workers between epochs.
        uncond_path: cached mode: the empty-prompt file (default: ``uncond.safetensors`` beside the shards).
        empty_captions: ``keep`` (default: train on them as the empty prompt, counted in
            ``empty_captions_kept``) or ``skip`` (skipped and counted, reason ``empty_caption``).
        buckets: cached mode: the aspect-ratio buckets (``sdxl`` or a list of [h, w]); null takes those
            of a bucketed cache (one folder per bucket), and a cache without buckets is one bucket.
        min_size, min_aesthetic, max_watermark, max_nsfw, filters: raw mode: LAION-style filters on
            the json metadata (``tdd_lightning.data.filters``), each counted as its own skip reason.

    A cached sample whose tensors hold NaN/Inf, or whose shapes differ from the cache's (``meta.json``
    latent shape, ``uncond`` text shapes), is skipped and counted (reasons ``nonfinite``, ``shape``).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        mode: str = "raw",
        batch_size: int = 16,
        num_workers: int = 2,
        resolution: int | Sequence[int] = 1024,
        center_crop: bool = False,
        random_flip: bool = False,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        shuffle_buffer: int = 64,
        shuffle_shards: int = 4,
        drop_last: bool = False,
        persistent_workers: bool = False,
        uncond_path: str | None = None,
        empty_captions: str = "keep",
        buckets: str | Sequence[Sequence[int]] | None = None,
        min_size: float | None = None,
        min_aesthetic: float | None = None,
        max_watermark: float | None = None,
        max_nsfw: float | None = None,
        filters: Sequence[str] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ConfigError("mode", mode, f"must be one of {', '.join(MODES)}")
        if empty_captions not in EMPTY_CAPTIONS:
            raise ConfigError("empty_captions", empty_captions, f"must be one of {', '.join(EMPTY_CAPTIONS)}")
        self.train_shards, self.mode, self.empty_captions = train_shards, mode, empty_captions
        self.shards = resolve_shards(train_shards)  # a missing shard fails here, named, before any worker
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.resolution = resolution if isinstance(resolution, int) else tuple(resolution)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.resampled, self.samples_per_epoch, self.seed = resampled, samples_per_epoch, seed
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.drop_last, self.persistent_workers = drop_last, persistent_workers
        self.uncond_path = uncond_path
        self.buckets = parse_buckets(buckets)
        self.filter = SampleFilter(min_size, min_aesthetic, max_watermark, max_nsfw, list(filters or ()))
        if mode == "raw" and self.buckets:
            raise ConfigError(
                "buckets", buckets, "buckets need the offline cache: encode with --buckets, then data=cached"
            )
        if mode == "cached" and self.filter.active:
            raise ConfigError(
                "mode",
                mode,
                "filters apply to raw shards; filter a cache when encoding it (--min-aesthetic ...)",
            )
        self.uncond: dict[str, torch.Tensor] | None = None
        self.train_dataset: ShardDataset | None = None
        self.meta = find_meta(self.shards[0]) if mode == "cached" else None
        self.position: StreamState | None = None
        self._restored: dict | None = None
        self._loader: ShardLoader | None = None

    # ---- set-up ----------------------------------------------------------------------------------
    def _decoder(self, latent_shape=None) -> RawDecoder | CachedDecoder:
        if self.mode == "cached":
            shapes = {k: tuple(v.shape) for k, v in self.uncond.items()}  # the text embeddings
            meta = self.meta or {}
            shapes.update({k: tuple(v) for k, v in (meta.get("tensor_shapes") or {}).items()})
            latents = latent_shape or meta.get("latent_shape")
            if latents:
                shapes["latents"] = tuple(latents)
            keys = meta.get("tensors")  # None (a cache from before the list): every tensor of a sample
            return CachedDecoder(shapes, empty_captions=self.empty_captions, keys=keys)
        preprocess = SDXLPreprocess(self.resolution, self.center_crop, self.random_flip)
        return RawDecoder(preprocess, empty_captions=self.empty_captions, sample_filter=self.filter)

    def _sources(self) -> list[Source]:
        """One source, or one per bucket folder of a bucketed cache (sized by meta.json's counts)."""
        recorded = (self.meta or {}).get("buckets")
        if self.mode != "cached" or not recorded:
            if self.buckets and len(self.buckets) > 1:
                raise ConfigError(
                    "buckets",
                    [list(b) for b in self.buckets],
                    "this cache has no buckets (encode with --buckets)",
                )
            return [Source("all", self.shards, self._decoder())]
        names = [bucket_of_name(n) for n in recorded]
        if self.buckets and set(self.buckets) != set(names):
            raise ConfigError(
                "buckets",
                [list(b) for b in self.buckets],
                f"the cache was encoded with the buckets {', '.join(recorded)}",
            )
        by_bucket: dict[str, list[str]] = {}
        for shard in self.shards:
            by_bucket.setdefault(_parent_name(shard), []).append(shard)
        unknown = sorted(set(by_bucket) - set(recorded))
        if unknown:
            raise ConfigError(
                "train_shards", self.train_shards, f"shards outside the cache's buckets: {unknown}"
            )
        sources = []
        for name, shards in sorted(by_bucket.items()):
            counts = recorded[name]["shards"]
            size = sum(counts.get(s.rsplit("/", 1)[-1], 0) for s in shards)
            sources.append(Source(name, shards, self._decoder(recorded[name]["latent_shape"]), size))
        return [s for s in sources if s.size > 0]

    def _layout(self, sources: list[Source]) -> str:
        names = "\n".join("/".join(s.rsplit("/", 2)[-2:]) for s in self.shards)  # folder/name: buckets
        names = hashlib.sha1(names.encode()).hexdigest()[:10]
        kind = "counted" if self.resampled or len(sources) > 1 else "one pass"
        return (
            f"{self.mode} {len(self.shards)} shards ({names}), {len(sources)} bucket(s), {kind}, "
            f"shuffle {self.shuffle_shards} x {self.shuffle_buffer}, seed {self.seed}"
        )

    def _dataset(self) -> ShardDataset:
        rank, world = rank_and_world(self.trainer)
        sources = self._sources()
        dataset = ShardDataset(
            self.shards,
            sources[0].decoder,
            sources=sources,
            shuffle=True,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_shards=self.shuffle_shards,
            resampled=self.resampled,
            samples_per_epoch=self.samples_per_epoch,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            skip_reasons=(*SKIP_REASONS, *self.filter.reasons),
        )
        readers = world * max(1, self.num_workers)
        shared = [s.name for s in sources if dataset.counted and len(s.shards) < readers]
        if shared and rank == 0:
            log.warning(
                "bucket(s) %s have fewer shards than the %d readers (ranks x workers): readers share their "
                "shards, so those samples repeat more often within an epoch",
                ", ".join(shared),
                readers,
            )
        self.position = StreamState(world, self.num_workers, self.batch_size, self._layout(sources))
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.mode == "cached" and self.uncond is None:
            self.uncond = load_uncond(self.uncond_path or self._uncond_default())
        if self.train_dataset is None:
            self.train_dataset = self._dataset()

    def _uncond_default(self) -> str:
        first = self.shards[0]
        here = _beside(first, UNCOND_FILE)
        up = _beside(first[: first.rfind("/")], UNCOND_FILE)
        return up if (self.meta or {}).get("buckets") and not is_url(up) and os.path.isfile(up) else here

    # ---- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self) -> ShardLoader:
        dataset = self.train_dataset
        epoch, resume = dataset.next_epoch, None
        if self._restored is not None:
            epoch, readers, first, message = resume_plan(self._restored, dataset.rank, self.position)
            if message and dataset.rank == 0:
                print(message, flush=True)
                log.warning(message)
            if readers:
                resume = (readers, first)
                self.position.load_state_dict(self._restored)
            self._restored = None
        elif getattr(self.trainer, "ckpt_path", None) and dataset.rank == 0:
            message = (
                f"data position: the checkpoint {self.trainer.ckpt_path} holds none (written before the data "
                "module kept one, or by another data module): the data starts at the beginning of epoch 0"
            )
            print(message, flush=True)
            log.warning(message)
        self._loader = ShardLoader(
            dataset,
            epoch=epoch,
            resume=resume,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=WorkerInit(dataset.rank),  # workers ignore the job's signals; Lightning's seeds
        )
        return self._loader

    # ---- the data position in checkpoints ---------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        loader = self._loader
        if loader is not None and self.position is not None:
            self.position.consumed(loader.tags.popleft() if loader.tags else None)
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position.state_dict()} if self.position is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("position")

    # ---- bad-input accounting --------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Samples skipped so far (all workers of this rank, all epochs)."""
        return self.train_dataset.skips.total if self.train_dataset is not None else 0

    def skipped_by_reason(self) -> dict[str, int]:
        return self.train_dataset.skips.by_reason() if self.train_dataset is not None else {}

    @property
    def skip_reasons(self) -> tuple[str, ...]:
        return (*SKIP_REASONS, *self.filter.reasons)

    @property
    def empty_captions_kept(self) -> int:
        """Samples trained on with an empty caption (``empty_captions=keep``), all workers and epochs."""
        return self.train_dataset.notes.count("empty_caption_kept") if self.train_dataset is not None else 0


class SkippedSamplesLogger(L.Callback):
    """Log the skipped-sample count as ``data/skipped``, and by reason as ``data/skipped_<reason>`` and
    ``data/empty_captions_kept`` (each summed over ranks; every rank logs every key)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "skipped"):
            return
        counts = {"data/skipped": dm.skipped}
        if isinstance(dm, ShardDataModule):
            by_reason = dm.skipped_by_reason()
            counts |= {f"data/skipped_{r}": by_reason.get(r, 0) for r in dm.skip_reasons}
            counts["data/empty_captions_kept"] = dm.empty_captions_kept
        for name, n in counts.items():
            value = torch.tensor(float(n), device=pl_module.device)
            pl_module.log(name, value, reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)
