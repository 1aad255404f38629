"""The compute floor, timed standalone on the same UNet: the passes a training step cannot avoid.

ALGORITHM.md section 2: one teacher forward of B + (B - dropped) samples (cond + uncond batched), one
target forward of B and one student forward+backward of B. Also, for the LoRA-vs-bare ratio, forwards
of the bare UNet (no LoRA layers) and of the student without gradients at batch B.

With ``ablation`` it also times the student's forward+backward (the biggest pass) in variants that might
lower the floor, each on the same inputs right after the default one: peft's low-rank LoRA path (its
backward needs no weight-sized gradient), channels_last memory format (a copy of the UNet), and bf16
autocast (a copy of the UNet; where the CPU has bf16). Their ratios to the default are medians of pairs.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

from tdd_lightning.bench.timing import time_call
from tdd_lightning.models.roles import STUDENT, TARGET

FLOOR = ("teacher fwd", "target fwd", "student fwd+bwd")
ABLATION = (
    "student fwd+bwd: peft low-rank",
    "student fwd+bwd: channels_last",
    "student fwd+bwd: bf16 autocast",
)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast has fast kernels here (CUDA: the device says; CPU: oneDNN's check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class FloorPasses:
    """Times the standalone passes on inputs shaped like the training batch."""

    def __init__(
        self,
        module,
        bare: torch.nn.Module | None,
        sync: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
        seed: int = 0,
        ablation: bool = False,
    ):
        self.module, self.bare, self.sync, self.clock, self.seed = module, bare, sync, clock, seed
        self.times: dict[str, list[float]] = defaultdict(list)
        self.inputs = None
        self.ablation = ablation
        self.copies: dict[str, torch.nn.Module] = {}

    def capture(self, batch: dict) -> None:
        """Inputs of batch B on the batch's device (values do not matter, shapes and dtypes do)."""
        x = batch["latents"].float()
        g = torch.Generator().manual_seed(self.seed)
        t = torch.randint(0, 1000, (x.shape[0],), generator=g).to(x.device)
        c = self.module.family.condition_from_batch(batch)
        self.inputs = (torch.randn(x.shape, generator=g).to(x.device), t, c)
        if self.ablation:  # copies of the UNet as the student, for the variants that change the model
            unet = self.module.unet
            self.copies["channels_last"] = copy.deepcopy(unet).to(memory_format=torch.channels_last)
            if bf16_supported(x.device):
                self.copies["bf16 autocast"] = copy.deepcopy(unet)

    def batch_of(self, n: int):
        x, t, c = self.inputs
        idx = torch.arange(n, device=x.device) % x.shape[0]
        return x[idx], t[idx], {k: v[idx] for k, v in c.items()}

    def run(self, teacher_batch: int, context=None) -> None:
        """One of each pass (``context``: e.g. the trainer's autocast), appended to ``times``."""
        roles, unet = self.module.roles, self.module.unet
        x, t, c = self.batch_of(self.inputs[0].shape[0])
        xt, tt, ct = self.batch_of(teacher_batch)

        def forward(role: str, *args) -> Callable[[], None]:
            def f():
                with torch.no_grad(), roles.role(role):
                    self.module.family.denoise(unet, *args)

            return f

        def student_fwd_bwd():
            with roles.role(STUDENT):
                with self.sync_phase("student fwd (grad)"):
                    loss = self.module.family.denoise(unet, x, t, c).float().square().mean()
                with self.sync_phase("student bwd"):
                    loss.backward()
            for p in roles.student_params:
                p.grad = None

        passes = {
            "teacher fwd": forward("teacher", xt, tt, ct),
            "target fwd": forward(TARGET, x, t, c),
            "student fwd+bwd": student_fwd_bwd,
            "student fwd": forward(STUDENT, x, t, c),
        }
        if self.bare is not None:
            bare = self.bare

            def bare_fwd():
                with torch.no_grad():
                    self.module.family.denoise(bare, x, t, c)

            passes["bare fwd"] = bare_fwd
        else:  # no bare copy (large models): the teacher role at batch B stands in
            passes["bare fwd"] = forward("teacher", x, t, c)
        with context or nullcontext():
            for name, fn in passes.items():
                self.times[name].append(time_call(fn, self.sync, self.clock))
        if self.ablation:
            self.run_ablation(x, t, c)

    def run_ablation(self, x: torch.Tensor, t: torch.Tensor, c: dict) -> None:
        """The student's forward+backward in each variant (module docstring), appended to ``times``."""
        roles = self.module.roles

        def fwd_bwd(unet, params, x=x, autocast=False):
            def f():
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = self.module.family.denoise(unet, x, t, c).float().square().mean()
                loss.backward()
                for p in params:
                    p.grad = None

            return f

        fused = roles.fused
        roles.set_fused(False)
        try:
            with roles.role(STUDENT):
                peft = time_call(fwd_bwd(roles.unet, roles.student_params), self.sync, self.clock)
        finally:
            roles.set_fused(fused)
        self.times[ABLATION[0]].append(peft)
        for name, label, kw in (
            ("channels_last", ABLATION[1], {"x": x.contiguous(memory_format=torch.channels_last)}),
            ("bf16 autocast", ABLATION[2], {"autocast": True}),
        ):
            unet = self.copies.get(name)
            if unet is None:
                continue
            params = [p for p in unet.parameters() if p.requires_grad]
            self.times[label].append(time_call(fwd_bwd(unet, params, **kw), self.sync, self.clock))

    @contextmanager
    def sync_phase(self, name: str):
        self.sync()
        t0 = self.clock()
        yield
        self.sync()
        self.times[name].append(self.clock() - t0)


def ablation_summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per variant: its median seconds and the median of its ratios to the default pass timed just before."""
    import statistics

    base = times.get("student fwd+bwd", [])
    out = {}
    for name in ABLATION:
        v = times.get(name)
        if v:
            ratios = [a / b for a, b in zip(v, base, strict=False)]
            out[name] = {"s": statistics.median(v), "ratio": statistics.median(ratios), "n": len(v)}
    return out


def format_ablation(summary: dict[str, dict[str, float]], bf16: bool) -> list[str]:
    """The ablation's lines for the report (ratios < 1: the variant is faster than the default)."""
    lines = ["floor ablation: student fwd+bwd variants / the default (merged LoRA, contiguous, fp32), pairs:"]
    for name in ABLATION:
        r = summary.get(name)
        if r is None:
            why = "no bf16 on this device" if "bf16" in name and not bf16 else "not run"
            lines.append(f"  {name.split(': ')[1]:16s} {why}")
        else:
            lines.append(
                f"  {name.split(': ')[1]:16s} {1e3 * r['s']:8.1f} ms  {r['ratio']:.2f}x  ({r['n']} pairs)"
            )
    return lines
