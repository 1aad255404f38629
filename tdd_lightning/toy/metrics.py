"""Metrics for generated shapes images with known prompts, in the evaluator's terms.

- prompt accuracy: every attribute of the prompt classified right (all ``HEADS``);
- per-attribute accuracy: one number per head;
- FD: Frechet distance between evaluator features of generated and held-out real images
  (Heusel et al. 2017, eq. 6 of the FID paper, on our features); biased by n, so always at equal counts;
- agreement with the teacher: mean L2 distance between the features of a k-step image and of the
  teacher's 50-step image from the same initial noise (eta 0); 0 means identical.
"""

from __future__ import annotations

import torch

from tdd_lightning.toy.data import HEADS, to_unit


@torch.no_grad()
def classify(model, pixels: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, H, W] -> (labels [N, len(HEADS)], features [N, F] float64), on the CPU."""
    preds, feats = [], []
    device = next(model.parameters()).device
    for i in range(0, len(pixels), batch_size):
        f = model.features(to_unit(pixels[i : i + batch_size].to(device)))
        preds.append(torch.stack([model.heads[h](f).argmax(1) for h in HEADS], 1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds), torch.cat(feats)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) between two feature sets [N, F]."""
    if len(f1) != len(f2):
        raise ValueError(f"FD is biased by n: compare equal counts (got {len(f1)} and {len(f2)})")
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross).item()


def agreement(f: torch.Tensor, f_ref: torch.Tensor) -> float:
    """Mean L2 distance between paired features (same prompt, same initial noise)."""
    return (f.double() - f_ref.double()).norm(dim=1).mean().item()


def score(
    preds: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, real_feats: torch.Tensor
) -> dict[str, float]:
    """Prompt accuracy, per-head accuracy and FD (vs ``real_feats``, same count) of one set."""
    correct = preds == labels
    out = {"prompt_acc": correct.all(1).float().mean().item(), "fd": frechet_distance(feats, real_feats)}
    out |= {f"acc_{h}": correct[:, k].float().mean().item() for k, h in enumerate(HEADS)}
    return out
