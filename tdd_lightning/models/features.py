"""The teacher's intermediate features for the adversarial heads: forward hooks on the one base model.

A family names its feature sites (``ModelFamily.discriminator_sites``: a UNet's down blocks and mid block; a
transformer's blocks); ``FeatureTap`` records their outputs during one forward and, when ``truncate`` is on,
stops that forward once the last site has run (what comes after cannot change the features). Outside
``FeatureTap.read`` the hooks do nothing, so the student, target and teacher passes of the step are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

LAYOUTS = ("spatial", "tokens")  # [B, C, H, W] feature maps | [B, L, C] token sequences


def first_tensor(output: Any) -> torch.Tensor:
    """A block's hidden states: the output itself, or its first element (diffusers down blocks return
    ``(hidden_states, skip_states)``)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass(frozen=True)
class FeatureSite:
    """One module whose output a head reads: its name, width and layout, and how to pick the features out of
    the module's output (``select``)."""

    name: str
    module: torch.nn.Module
    channels: int
    layout: str = "spatial"
    select: Callable[[Any], torch.Tensor] = first_tensor

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"feature site {self.name}: layout {self.layout!r} is not one of {LAYOUTS}")


class StopForward(Exception):
    """Raised by the last site's hook to end a truncated feature pass (caught by ``FeatureTap.read``)."""


class FeatureTap:
    """Forward hooks on ``sites``; ``read(forward)`` returns their outputs of one call, in site order."""

    def __init__(self, sites: Sequence[FeatureSite], truncate: bool = True):
        self.sites, self.truncate = list(sites), bool(truncate)
        self._features: list[torch.Tensor | None] | None = None
        self.handles = [site.module.register_forward_hook(self._hook(i)) for i, site in enumerate(self.sites)]

    @property
    def capturing(self) -> bool:
        """True during ``read`` (the benchmark's UNet timers leave feature passes to their own phases)."""
        return self._features is not None

    def _hook(self, i: int):
        def hook(module, args, output):
            if self._features is None:
                return None
            self._features[i] = self.sites[i].select(output)
            if self.truncate and all(f is not None for f in self._features):
                raise StopForward
            return None

        return hook

    def read(self, forward: Callable[[], Any]) -> list[torch.Tensor]:
        """The sites' features of one call of ``forward`` (stopped after the last site when truncating)."""
        self._features = [None] * len(self.sites)
        try:
            forward()
        except StopForward:
            pass
        finally:
            features, self._features = self._features, None
        missing = [s.name for s, f in zip(self.sites, features, strict=True) if f is None]
        if missing:
            raise RuntimeError(f"the forward never ran the feature sites {missing}")
        return features

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
