"""The toy evaluator: a small CNN that classifies every attribute of a real two-object shapes image.

Three conv blocks (conv-BN-ReLU, max-pool) keep a 4x4 spatial map, a 128-d feature layer (the
features the Frechet distance and the teacher agreement use) and one linear head per attribute
(``HEADS``: relation axis, then size, colour and shape of the first and the second object).
Trained with mild noise and blur so the VAE's slightly soft decodings are judged fairly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.data import HEADS, to_unit


@dataclass
class EvaluatorConfig:
    channels: tuple[int, ...] = (32, 64, 96)
    features: int = 128
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2.0e-3  # AdamW, cosine decay
    noise: float = 0.06  # max std of added Gaussian noise (images in [-1, 1])
    blur_p: float = 0.5  # probability of mixing in a 3x3 box blur
    seed: int = 0


class AttributeClassifier(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (32, 64, 96), features: int = 128, size: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        side = size // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, features), nn.ReLU())
        self.heads = nn.ModuleDict({h: nn.Linear(features, len(v)) for h, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> features [B, F]."""
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}


def augment(x: torch.Tensor, cfg: EvaluatorConfig, g: torch.Generator) -> torch.Tensor:
    """Mild blur (random mix with a 3x3 box blur) and Gaussian noise of random strength."""
    B = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(B, 1, 1, 1, generator=g) * (torch.rand(B, 1, 1, 1, generator=g) < cfg.blur_p)
    x = x + mix * (blurred - x)
    return x + torch.rand(B, 1, 1, 1, generator=g) * cfg.noise * torch.randn(x.shape, generator=g)


def train_classifier(
    model: AttributeClassifier, pixels: torch.Tensor, labels: torch.Tensor, cfg: EvaluatorConfig
) -> float:
    """Train on uint8 images [N, 3, H, W] with labels [N, len(HEADS)]; returns the last mean loss."""
    from tdd_lightning.toy.vae import cosine_lr

    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * (len(pixels) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, steps // 20))
    model.train()
    avg = None
    bar = progress_bar(range(steps), desc="evaluator", mininterval=5)
    for step in bar:
        if step % (len(pixels) // cfg.batch_size) == 0:
            order = torch.randperm(len(pixels), generator=g)
        i = step % (len(pixels) // cfg.batch_size)
        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        out = model(augment(to_unit(pixels[idx]), cfg, g))
        loss = sum(F.cross_entropy(out[h], labels[idx, k]) for k, h in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
    model.eval()
    return avg


def save_evaluator(model: AttributeClassifier, cfg: EvaluatorConfig, out: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    config = {
        "channels": list(cfg.channels),
        "features": cfg.features,
        "heads": {h: list(v) for h, v in HEADS.items()},
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "build_info.json").write_text(json.dumps({"config": asdict(cfg)} | info, indent=1))


def load_evaluator(path: str | Path) -> AttributeClassifier:
    """The shipped evaluator (eval mode, frozen)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config["heads"] != {h: list(v) for h, v in HEADS.items()}:
        raise ValueError(f"{path} was trained for other heads than tdd_lightning.toy.data.HEADS")
    model = AttributeClassifier(tuple(config["channels"]), config["features"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval().requires_grad_(False)
