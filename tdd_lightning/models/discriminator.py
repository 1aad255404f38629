"""The adversarial heads (ALGORITHM.md section 7): one small network per feature site of the frozen teacher.

Each head is conv 1x1 -> GroupNorm -> LeakyReLU, twice, with a residual around the pair, then a 1x1 conv to
one channel: a logit per position (spatial sites, [B, 1, H, W]) or, for token sites, per token averaged over
the tokens ([B, 1]). Every operation is per sample (GroupNorm normalises within a sample), so a sample's
logits depend on that sample's features only; the heads take the whole batch (a defect of the reference FLUX
code was heads that saw one sample of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tdd_lightning.models.features import FeatureSite

LEAKY_SLOPE = 0.2  # LeakyReLU negative slope of the heads


def _block(conv: type[nn.Module], channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        conv(channels, channels, kernel_size=1), nn.GroupNorm(groups, channels), nn.LeakyReLU(LEAKY_SLOPE)
    )


class Head(nn.Module):
    """One site's head: h = x + B2(B1(x)), B = conv 1x1 -> GroupNorm -> LeakyReLU; logit = conv 1x1(h)."""

    def __init__(self, channels: int, layout: str = "spatial", norm_groups: int = 32):
        super().__init__()
        conv = nn.Conv2d if layout == "spatial" else nn.Conv1d
        groups = math.gcd(norm_groups, channels)
        self.layout = layout
        self.block1, self.block2 = _block(conv, channels, groups), _block(conv, channels, groups)
        self.out = conv(channels, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.transpose(1, 2) if self.layout == "tokens" else features  # [B, L, C] -> [B, C, L]
        x = x.to(self.out.weight.dtype)
        logits = self.out(x + self.block2(self.block1(x)))
        return logits.mean(dim=2) if self.layout == "tokens" else logits  # tokens: pooled to [B, 1]


class Discriminator(nn.Module):
    """The heads of all sites: ``forward(features)`` -> one logit tensor per site, in site order."""

    def __init__(self, sites: Sequence[FeatureSite], norm_groups: int = 32):
        super().__init__()
        self.site_names = [s.name for s in sites]
        self.heads = nn.ModuleList(Head(s.channels, s.layout, norm_groups) for s in sites)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, features, strict=True)]
