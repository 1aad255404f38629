"""A synthetic data module: fixed random latents and text embeddings in the cached-batch format.

For smoke tests and sweeps of the training machinery where image content does not matter. Shapes
follow the model (latent channels and size, the family's text tensors), read from the pipeline folder's
configs; the family's other condition parts are those of an uncropped square image.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from tdd_lightning.data.ranks import rank_and_world
from tdd_lightning.data.resumable import ResumableLoader
from tdd_lightning.models.families import get_family


class SyntheticLatents(Dataset):
    """``num_samples`` fixed random latents and text tensors (``text_shapes``: per-sample shape by name,
    drawn in that order after the latents), plus the fixed ``extra`` condition parts of every sample."""

    def __init__(
        self,
        num_samples: int,
        latent_shape,
        text_shapes: dict[str, tuple[int, ...]],
        extra: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        c, h, w = latent_shape
        self.latents = torch.randn(num_samples, c, h, w, generator=g)
        self.text = {k: torch.randn(num_samples, *shape, generator=g) for k, shape in text_shapes.items()}
        self.extra = dict(extra or {})

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {
            "latents": self.latents[i],
            **{k: v[i] for k, v in self.text.items()},
            **self.extra,
            "caption": f"synthetic sample {i}",
        }


def synthetic_latents(family, num_samples: int, latent_shape, text_shapes, seed: int = 0) -> SyntheticLatents:
    """The family's synthetic set: its text parts random, its other parts those of an uncropped square
    image of the VAE's side (8 x the latent side)."""
    extra = {k: v[0] for k, v in family.square_geometry(8 * latent_shape[-1], 1).items()}
    return SyntheticLatents(num_samples, latent_shape, text_shapes, extra, seed)


class SyntheticDataModule(L.LightningDataModule):
    """Cached-format batches of fixed random tensors; ``uncond`` is a fixed random 'empty prompt'."""

    def __init__(
        self,
        pretrained: str,
        family: str = "sdxl",
        num_samples: int = 256,
        batch_size: int = 8,
        latent_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.pretrained, self.num_samples, self.batch_size = pretrained, num_samples, batch_size
        self.family = get_family(family)
        self.latent_size, self.num_workers, self.seed = latent_size, num_workers, seed
        self.uncond = None

    def setup(self, stage: str | None = None) -> None:
        if not Path(self.pretrained, self.family.denoiser_subfolder).is_dir():
            raise FileNotFoundError(f"data.pretrained={self.pretrained} is not a diffusers model folder")
        channels, h, w = self.family.latent_shape_of(self.pretrained)
        text_shapes = self.family.text_shapes(self.pretrained)
        shape = (channels, self.latent_size or h, self.latent_size or w)
        self.dataset = synthetic_latents(self.family, self.num_samples, shape, text_shapes, self.seed)
        g = torch.Generator().manual_seed(self.seed + 1)
        self.uncond = {k: torch.randn(*size, generator=g) for k, size in text_shapes.items()}

    def train_dataloader(self) -> ResumableLoader:
        rank, world = rank_and_world(self.trainer)
        return ResumableLoader(
            self.dataset,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )
