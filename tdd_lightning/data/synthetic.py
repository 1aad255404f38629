"""A synthetic data module: fixed random latents and text embeddings in the cached-batch format.

For smoke tests and sweeps of the training machinery where image content does not matter. Shapes
follow the model (latent channels and size, text widths), read from the pipeline folder's configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from tdd_lightning.data.ranks import rank_and_world
from tdd_lightning.data.resumable import ResumableLoader
from tdd_lightning.models.conditioning import square_time_ids


def text_dims(pretrained: str | Path) -> tuple[int, int]:
    """(D1 + D2, D2): the concatenated hidden width and the pooled width of an SDXL folder."""
    root = Path(pretrained)
    te1 = json.loads((root / "text_encoder" / "config.json").read_text())
    te2 = json.loads((root / "text_encoder_2" / "config.json").read_text())
    return te1["hidden_size"] + te2["hidden_size"], te2["projection_dim"]


class SyntheticLatents(Dataset):
    def __init__(self, num_samples: int, latent_shape, embed_dim: int, pooled_dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c, h, w = latent_shape
        self.latents = torch.randn(num_samples, c, h, w, generator=g)
        self.prompt_embeds = torch.randn(num_samples, 77, embed_dim, generator=g)
        self.pooled = torch.randn(num_samples, pooled_dim, generator=g)
        self.time_ids = square_time_ids(8 * h, 1)[0]  # an uncropped square image of the VAE's side

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {
            "latents": self.latents[i],
            "prompt_embeds": self.prompt_embeds[i],
            "pooled_prompt_embeds": self.pooled[i],
            "time_ids": self.time_ids,
            "caption": f"synthetic sample {i}",
        }


class SyntheticDataModule(L.LightningDataModule):
    """Cached-format batches of fixed random tensors; ``uncond`` is a fixed random 'empty prompt'."""

    def __init__(
        self,
        pretrained: str,
        num_samples: int = 256,
        batch_size: int = 8,
        latent_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.pretrained, self.num_samples, self.batch_size = pretrained, num_samples, batch_size
        self.latent_size, self.num_workers, self.seed = latent_size, num_workers, seed
        self.uncond = None

    def setup(self, stage: str | None = None) -> None:
        if not Path(self.pretrained, "unet").is_dir():
            raise FileNotFoundError(f"data.pretrained={self.pretrained} is not a diffusers SDXL folder")
        unet_cfg = json.loads((Path(self.pretrained) / "unet" / "config.json").read_text())
        size = self.latent_size or unet_cfg["sample_size"]
        embed, pooled = text_dims(self.pretrained)
        shape = (unet_cfg["in_channels"], size, size)
        self.dataset = SyntheticLatents(self.num_samples, shape, embed, pooled, self.seed)
        g = torch.Generator().manual_seed(self.seed + 1)
        self.uncond = {
            "prompt_embeds": torch.randn(77, embed, generator=g),
            "pooled_prompt_embeds": torch.randn(pooled, generator=g),
        }

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
