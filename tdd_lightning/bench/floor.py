"""The compute floor, timed standalone on the same UNet: the passes a training step cannot avoid.

ALGORITHM.md section 2: one teacher forward of B + (B - dropped) samples (cond + uncond batched), one
target forward of B and one student forward+backward of B. Also, for the LoRA-vs-bare ratio, forwards
of the bare UNet (no LoRA layers) and of the student without gradients at batch B.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

from tdd_lightning.bench.timing import time_call
from tdd_lightning.models.conditioning import unet_eps
from tdd_lightning.models.roles import STUDENT, TARGET

FLOOR = ("teacher fwd", "target fwd", "student fwd+bwd")


class FloorPasses:
    """Times the standalone passes on inputs shaped like the training batch."""

    def __init__(
        self,
        module,
        bare: torch.nn.Module | None,
        sync: Callable[[], None],
        clock: Callable[[], float] = time.perf_counter,
        seed: int = 0,
    ):
        self.module, self.bare, self.sync, self.clock, self.seed = module, bare, sync, clock, seed
        self.times: dict[str, list[float]] = defaultdict(list)
        self.inputs = None

    def capture(self, batch: dict) -> None:
        """Inputs of batch B on the batch's device (values do not matter, shapes and dtypes do)."""
        x = batch["latents"].float()
        g = torch.Generator().manual_seed(self.seed)
        t = torch.randint(0, 1000, (x.shape[0],), generator=g).to(x.device)
        c = {k: batch[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids")}
        self.inputs = (torch.randn(x.shape, generator=g).to(x.device), t, c)

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
                    unet_eps(unet, *args)

            return f

        def student_fwd_bwd():
            with roles.role(STUDENT):
                with self.sync_phase("student fwd (grad)"):
                    loss = unet_eps(unet, x, t, c).float().square().mean()
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
                    unet_eps(bare, x, t, c)

            passes["bare fwd"] = bare_fwd
        else:  # no bare copy (large models): the teacher role at batch B stands in
            passes["bare fwd"] = forward("teacher", x, t, c)
        with context or nullcontext():
            for name, fn in passes.items():
                self.times[name].append(time_call(fn, self.sync, self.clock))

    @contextmanager
    def sync_phase(self, name: str):
        self.sync()
        t0 = self.clock()
        yield
        self.sync()
        self.times[name].append(self.clock() - t0)
