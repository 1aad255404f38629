"""The LightningDataModule over webdataset tar shards, raw images or the offline cache.

- ``mode="raw"``: batches of ``pixels`` [B, 3, H, W] in [-1, 1], the geometry ``original_size`` [B, 2]
  and ``crop_top_left`` [B, 2], ``caption``; the LightningModule's family encoder turns them into its
  condition (VAE + text encoders) on the fly.
- ``mode="cached"``: batches of ``latents``, the condition tensors of the model family that wrote the
  cache (the names in its ``meta.json``, else every tensor of a sample) and ``caption``, read from
  shards written by ``python -m tdd_lightning.data.encode``; no VAE or text encoder is loaded.
  ``uncond`` then holds the encoded empty prompt (its text tensors) from ``uncond.safetensors``.
Every batch also has ``key`` (the sample names). Bad samples are skipped with a warning and counted in
``skipped``, by reason in ``skipped_by_reason()`` (log them with ``SkippedSamplesLogger``); a pass that
yields no batch at all is an error. A missing shard or a pattern that matches none is a ``ConfigError``
naming ``train_shards`` when the module is built, before any worker starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from tdd_lightning.data.dataset import (
    EMPTY_CAPTIONS,
    SKIP_REASONS,
    CachedDecoder,
    NoValidSamplesError,
    RawDecoder,
    ShardDataset,
    collate,
)
from tdd_lightning.data.preprocess import SDXLPreprocess
from tdd_lightning.data.ranks import rank_and_world
from tdd_lightning.data.shards import (
    ShardNotFoundError,
    check_shards_exist,
    expand_shards,
    is_url,
    open_shard,
)
from tdd_lightning.data.workers import WorkerInit
from tdd_lightning.errors import ConfigError, UserError

UNCOND_FILE = "uncond.safetensors"  # written by the offline cache next to its shards
META_FILE = "meta.json"  # idem: settings and shapes (the latent shape checks every cached sample)
MODES = ("raw", "cached")


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


class ShardLoader(DataLoader):
    """A DataLoader over a ShardDataset that advances its epoch and refuses an epoch with no batch."""

    def __iter__(self):
        self.dataset.epoch += 1  # workers are re-created each epoch from this copy (if not persistent)
        batches = 0
        for batch in super().__iter__():
            batches += 1
            yield batch
        if batches == 0:
            ds = self.dataset
            raise NoValidSamplesError(
                f"no batch from {len(ds.shards)} shard(s) ({ds.shards[0]}, ...): "
                f"{ds.skips.total} sample(s) skipped so far {ds.skips.by_reason()}; see the warnings above"
                + (" (drop_last drops a worker's last partial batch)" if self.drop_last else "")
            )


def cached_meta(first_shard: str) -> dict:
    """The cache's ``meta.json`` beside ``first_shard`` ({} when there is none)."""
    path = _beside(first_shard, META_FILE)
    if is_url(path) or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
        seed: seeds the shard order (shared by ranks) and each reader's sample order and crops.
        pin_memory: DataLoader pin_memory.
        shuffle_buffer: samples held per worker for shuffling (undecoded bytes; 0 = no shuffle).
        drop_last: drop each worker's last partial batch.
        persistent_workers: keep workers between epochs.
        uncond_path: cached mode: the empty-prompt file (default: ``uncond.safetensors`` beside the shards).
        empty_captions: ``keep`` (default: train on them as the empty prompt, counted in
            ``empty_captions_kept``) or ``skip`` (skipped and counted, reason ``empty_caption``).

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
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        persistent_workers: bool = False,
        uncond_path: str | None = None,
        empty_captions: str = "keep",
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
        self.shuffle_buffer, self.drop_last, self.persistent_workers = (
            shuffle_buffer,
            drop_last,
            persistent_workers,
        )
        self.uncond_path = uncond_path
        self.uncond: dict[str, torch.Tensor] | None = None
        self.train_dataset: ShardDataset | None = None

    # ---- set-up ----------------------------------------------------------------------------------
    def _decoder(self) -> RawDecoder | CachedDecoder:
        if self.mode == "cached":
            meta = cached_meta(self.shards[0])
            shapes = {k: tuple(v.shape) for k, v in self.uncond.items()}  # the text embeddings
            shapes.update({k: tuple(v) for k, v in (meta.get("tensor_shapes") or {}).items()})
            if meta.get("latent_shape"):
                shapes["latents"] = tuple(meta["latent_shape"])
            keys = meta.get("tensors")  # None (a cache from before the list): every tensor of a sample
            return CachedDecoder(shapes, empty_captions=self.empty_captions, keys=keys)
        preprocess = SDXLPreprocess(self.resolution, self.center_crop, self.random_flip)
        return RawDecoder(preprocess, empty_captions=self.empty_captions)

    def _dataset(self, shards: list[str], train: bool) -> ShardDataset:
        rank, world = rank_and_world(self.trainer)
        return ShardDataset(
            shards,
            self._decoder(),
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled and train,
            samples_per_epoch=self.samples_per_epoch if train else None,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.mode == "cached" and self.uncond is None:
            self.uncond = load_uncond(self.uncond_path or _beside(self.shards[0], UNCOND_FILE))
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.shards, train=True)

    # ---- loaders ---------------------------------------------------------------------------------
    def _loader(self, dataset: ShardDataset) -> ShardLoader:
        return ShardLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=WorkerInit(dataset.rank),  # workers ignore the job's signals; Lightning's seeds
        )

    def train_dataloader(self) -> ShardLoader:
        if self.trainer is not None:  # after a resume, a new stream rather than a replay of the first samples
            self.train_dataset.stream = self.trainer.global_step
        return self._loader(self.train_dataset)

    # ---- bad-input accounting --------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Samples skipped so far (all workers of this rank, all epochs)."""
        return self.train_dataset.skips.total if self.train_dataset is not None else 0

    def skipped_by_reason(self) -> dict[str, int]:
        return self.train_dataset.skips.by_reason() if self.train_dataset is not None else {}

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
            counts |= {f"data/skipped_{r}": by_reason.get(r, 0) for r in SKIP_REASONS}
            counts["data/empty_captions_kept"] = dm.empty_captions_kept
        for name, n in counts.items():
            value = torch.tensor(float(n), device=pl_module.device)
            pl_module.log(name, value, reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)
