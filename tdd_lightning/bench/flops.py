"""Model FLOPs of a training step's passes, counted on the meta device (no memory, no time).

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on a meta copy of the UNet with peft's LoRA
(base op + low-rank A, B: the algorithm's FLOPs, not the merged-weight trick's, and no recompute from
gradient checkpointing), at the step's batch sizes: teacher forward of the mean teacher batch, target
forward of B, student forward+backward of B. MFU = these FLOPs per second over the device's peak.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# dense bf16 tensor-core peaks (TFLOP/s) by device name, for MFU
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(
    unet_config: Mapping,
    lora: Mapping,
    target_modules: Sequence[str],
    batch: int,
    teacher_batch: float,
    text: Mapping[str, Sequence[int]],
    family=None,
) -> dict[str, float]:
    """FLOPs of the three passes of one step (teacher scaled linearly to the mean teacher batch).

    ``text``: the family's text tensors' per-sample shapes; ``family``: the ``ModelFamily`` (None: SDXL)."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tdd_lightning.models.families import get_family
    from tdd_lightning.models.roles import lora_config

    family = family or get_family(None)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config)).requires_grad_(False)
        unet.add_adapter(lora_config(int(lora["rank"]), lora.get("alpha"), target_modules), adapter_name="s")
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    size = unet.config.sample_size
    x = torch.zeros(batch, unet.config.in_channels, size, size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    geometry = family.square_geometry(8 * size, batch)
    c = family.condition(
        {k: torch.zeros(batch, *shape, device="meta") for k, shape in text.items()},
        {k: torch.zeros(v.shape, device="meta") for k, v in geometry.items()},
    )

    def set_enabled(on: bool) -> None:
        for layer in layers:
            layer._disable_adapters = not on

    def forward():
        with torch.no_grad():
            family.denoise(unet, x, t, c)

    set_enabled(False)
    teacher = _count(forward) * teacher_batch / batch
    set_enabled(True)
    target = _count(forward)
    student = _count(lambda: family.denoise(unet, x, t, c).float().square().mean().backward())
    return {"teacher fwd": teacher, "target fwd": target, "student fwd+bwd": student}
