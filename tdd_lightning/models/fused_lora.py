"""Merged-weight LoRA forward: y = base(x; W + s B A) as ONE op, instead of peft's base(x) + s B(A(x)).

peft evaluates a LoRA layer as the base op plus two thin rank-r ops and two more passes over the output
(scale, add). On the tiny UNet (rank 8 on 32/64 channels) that made each forward ~45% slower than the
bare UNet for ~19% more FLOPs. Merging on the fly costs one weight-sized matmul per layer (independent of
the batch) and leaves the bare layer's op; autograd carries the gradient to A and B through W + s B A.
Measured on the tiny UNet (docs/results/performance.md): forward ~1.05x the bare UNet instead of ~1.45x,
and the student's forward+backward is faster too on the CPU. With gradients the merged form costs a full
weight gradient per layer (SDXL student forward+backward: 21.2 instead of 15.9 TFLOPs at batch 1), which
only pays where thin rank-r ops are slow: so on accelerators the student (with grad) keeps peft's path and
the merged form serves the no-grad passes.

Exact layout and names are kept (only the layer's class changes to a subclass), so state dicts, peft's
own APIs and the LoRA export are untouched. The merged path runs only where it is numerically safe:
fp32 input, fp32 base and LoRA weights, no autocast, one active adapter, no dropout, DoRA or lora_bias;
anything else falls back to peft's forward (in bf16/fp16 the small delta s B A would be rounded to the
base weight's precision). Memory: the student's forward saves each merged weight for its backward (one
extra copy of the adapted weights, small next to activations except for fp32 giants).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from peft.tuners import lora


def _mergeable(layer, x: torch.Tensor) -> str | None:
    """The active adapter's name if ``layer`` can run merged on ``x``, else None (use peft's forward)."""
    if layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    fp32 = torch.float32
    if not (x.dtype == layer.base_layer.weight.dtype == layer.lora_A[name].weight.dtype == fp32):
        return None
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: FLOP counting
        return None
    if x.device.type != "cpu" and torch.is_grad_enabled() and layer.lora_A[name].weight.requires_grad:
        return None  # accelerators: peft's low-rank backward needs fewer FLOPs than a full weight gradient
    return name


class FusedLoraLinear(lora.Linear):
    """peft's LoRA Linear whose fp32 forward is F.linear(x, W + s B A, b)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters and not self.merged:  # the teacher: the bare layer, exactly
            return self.base_layer(x)
        name = _mergeable(self, x)
        if name is None:
            return super().forward(x)
        base = self.base_layer
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return F.linear(x, torch.addmm(base.weight, B, A, alpha=self.scaling[name]), base.bias)


class FusedLoraConv2d(lora.Conv2d):
    """peft's LoRA Conv2d whose fp32 forward is conv2d(x, W + s B A, b); B is 1x1, A has W's kernel."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            return super().forward(x, *args, **kwargs)
        if self.disable_adapters and not self.merged:
            return self.base_layer(x)
        base = self.base_layer
        name = _mergeable(self, x)
        # peft's lora_A ignores the base's dilation and padding mode: merge only where they agree
        plain = base.groups == 1 and all(d == 1 for d in base.dilation) and base.padding_mode == "zeros"
        if name is None or not plain:
            return super().forward(x)
        W, A, B = base.weight, self.lora_A[name].weight, self.lora_B[name].weight
        merged = torch.addmm(W.flatten(1), B.flatten(1), A.flatten(1), alpha=self.scaling[name])
        return base._conv_forward(x, merged.view_as(W), base.bias)


FUSED = {lora.Linear: FusedLoraLinear, lora.Conv2d: FusedLoraConv2d}
UNFUSED = {v: k for k, v in FUSED.items()}


def set_fused(layers: Iterable[torch.nn.Module], fused: bool) -> int:
    """Switch peft LoRA layers to the merged forward (or back to peft's); returns how many switched."""
    table = FUSED if fused else UNFUSED
    n = 0
    for layer in layers:
        cls = table.get(type(layer))
        if cls is not None:
            layer.__class__ = cls
            n += 1
    return n
