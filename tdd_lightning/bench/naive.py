"""The script baseline ("naive mode"): per step, the work of diffusers' ``train_lcm_distill_lora_sdxl.py``.

What that script does each step (examples/consistency_distillation, read phase by phase), and so this:
- text: both CLIP text encoders on the batch's captions (no caption dropout in the step);
- vae: ``vae.encode(pixels).latent_dist.sample()`` on the pixels (no latent cache);
- student: one LoRA forward of B with gradients (peft's LoRA forward: the script has no merged path);
- toggles: ``unet.disable_adapters()`` before the teacher and ``unet.enable_adapters()`` after it (peft
  rewrites ``requires_grad`` on every LoRA tensor each time);
- teacher: the conditional and the unconditional (zero embeddings) branches as two forwards of B, no grad;
- target: one forward of B without gradients through the *student's own* adapter (the script has no
  separate target network and no EMA), i.e. the online-student target;
- backward, ``clip_grad_norm_``, AdamW, an lr scheduler step, ``zero_grad(set_to_none=True)``, and the
  loss read with ``.item()`` for logging.
Until issue 19 this mode also switched a second (EMA target) adapter with ``set_adapter`` twice per step
and ran a Python-loop EMA: work the script does not do. The numbers it computes are not TDDModule's (its
target is the online student), only its cost is the script's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from tdd_lightning.bench.timing import PhaseTimer
from tdd_lightning.diffusion import add_noise, append_dims, cfg_combine, ddim_jump
from tdd_lightning.models.roles import STUDENT

# The script's own split, ms per step (issue 19: tiny UNet, 172,288 LoRA params, batch 8, 256 px, fp32,
# 2 threads, this machine; the script at diffusers commit 58eb52c, unedited; 916 ms/step end to end).
SCRIPT_SPLIT_MS = {
    "text": 9.0,
    "vae": 363.0,
    "student fwd": 123.0,
    "toggles": 10.0,
    "teacher fwd": 164.0,
    "target fwd": 129.0,
    "student bwd": 169.0,
}
SCRIPT_STEP_MS = 916.0
PHASES = (
    "data",
    "text",
    "vae",
    "student fwd",
    "toggles",
    "teacher fwd",
    "target fwd",
    "step maths",
    "student bwd",
    "optimizer",
    "logging",
)


class NaiveTrainer:
    """Runs script-baseline steps on the module's UNet and student adapter (``exit`` restores the roles).

    ``records``: one dict of phase seconds per timed step (``step(..., record=True)``).
    """

    def __init__(
        self,
        module,
        encoder,
        batch_size: int,
        device: torch.device,
        num_samples: int = 32,
        seed: int = 0,
        sync: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.m, self.encoder, self.B, self.device = module, encoder, batch_size, device
        roles = module.roles
        self.fused_before = roles.fused
        self.params = roles.student_params
        self.optimizer = module.optimizer_factory(params=self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        g = torch.Generator().manual_seed(seed)
        side = 8 * module.unet.config.sample_size
        self.pixels = (torch.rand(num_samples, 3, side, side, generator=g) * 2 - 1).to(device)
        self.captions = [f"synthetic sample {i}" for i in range(num_samples)]
        self.geometry = module.family.square_geometry(side, batch_size, device)
        self.timer = PhaseTimer(sync, clock)
        self.records: list[dict[str, float]] = []
        self.i = 0

    def batch(self):
        n = self.pixels.shape[0]
        idx = [(self.i * self.B + k) % n for k in range(self.B)]
        self.i += 1
        return self.pixels[idx], [self.captions[k] for k in idx], self.geometry

    def step(self, context=None, record: bool = False) -> float:
        """One step; with ``record`` its phase times are appended to ``records``. Returns the loss."""
        m, unet, B, device, timer = self.m, self.m.unet, self.B, self.device, self.timer
        ts, schedule = m.target_selection, m.schedule
        timer.take()
        timer.armed = record
        g = torch.Generator(device=device).manual_seed(1000 + self.i)
        with timer("data"):
            pixels, captions, geometry = self.batch()
        family = m.family
        with context or nullcontext():
            with timer("text"):
                text = self.encoder.encode_captions(captions)
            with timer("vae"):
                x0 = self.encoder.encode_images(pixels, sample=True, generator=g)
            with timer("step maths"):
                c = family.condition(text, geometry)
                u = family.unconditional_like(c, None)  # zeros
                w = m.guidance.draw(B, g, device).w
                t, t_prev = ts.sample_times(B, g, device)
                eps = torch.randn(x0.shape, generator=g, device=device)
                a_t, sigma_t = schedule.a_sigma(t, x0)
                x_t = add_noise(x0, eps, a_t, sigma_t)
                s = ts.select(t_prev, g)
            with timer("student fwd"):
                eps_s = family.denoise(unet, x_t, t, c)
            with timer("step maths"):
                pred = ts.consistency(x_t, eps_s.float(), t, s, schedule)
            with timer("toggles"):
                unet.disable_adapters()
            with torch.no_grad():
                with timer("teacher fwd"):
                    eps_c = family.denoise(unet, x_t, t, c).float()
                    eps_u = family.denoise(unet, x_t, t, u).float()
                with timer("toggles"):
                    unet.enable_adapters()
                with timer("step maths"):
                    eps_teacher = cfg_combine(eps_c, eps_u, append_dims(w, eps_c.ndim))
                    a_tp, sigma_tp = schedule.a_sigma(t_prev, x0)
                    x_tp = ddim_jump(x_t, eps_teacher, a_t, sigma_t, a_tp, sigma_tp)
                with timer("target fwd"):  # the student's own adapter: the script has no target network
                    eps_target = family.denoise(unet, x_tp, t_prev, c)
                with timer("step maths"):
                    target = ts.consistency(x_tp, eps_target.float(), t_prev, s, schedule)
            with timer("step maths"):
                loss = m.distill_loss(pred, target)
        with timer("student bwd"):
            loss.backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with timer("logging"):
            value = loss.detach().item()
        if record:
            self.records.append(timer.take())
        timer.armed = False
        return value

    def enter(self) -> None:
        """peft's own LoRA forward, the student active (call ``exit`` before the module trains again)."""
        roles = self.m.roles
        roles.set_fused(False)
        roles.use(STUDENT)

    def exit(self) -> None:
        """Back to the module's own role handling."""
        roles = self.m.roles
        roles.set_fused(self.fused_before)
        roles.use(STUDENT)
        for p in roles.student_params:
            p.requires_grad_(True)
        for p in roles.target_params:
            p.requires_grad_(False)


def phase_means(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per phase over the recorded steps (0 for a phase a step did not enter)."""
    if not records:
        return {}
    return {k: statistics.fmean(r.get(k, 0.0) for r in records) for k in PHASES}


# our step's phases that do the same job as the script's (data: ours reads cached latents + embeddings)
OURS_FOR = {
    "data": ("data",),
    "student fwd": ("student fwd",),
    "teacher fwd": ("teacher fwd",),
    "target fwd": ("target fwd",),
    "step maths": ("step maths", "ema"),
    "student bwd": ("student bwd",),
    "optimizer": ("optimizer",),
    "logging": ("logging", "other"),
}


def format_phase_table(naive: dict, ours_phases: dict[str, float], ours_step: float) -> list[str]:
    """Lines: each phase of the script baseline (this run), the script's own split and our step's."""

    def ms(v: float | None) -> str:
        return f"{'-':>8s}" if v is None else f"{1e3 * v:8.1f}"

    p = naive["phases_mean_s"]
    lines = [
        "phase by phase (ms/step): script = diffusers train_lcm_distill_lora_sdxl.py's own split "
        "(issue 19, fixed figures);",
        "  baseline = the naive mode doing the script's work, and ours, both measured in this run",
        f"  {'phase':14s} {'script':>8s} {'baseline':>8s} {'ours':>8s}",
    ]
    for k in PHASES:
        script = SCRIPT_SPLIT_MS.get(k)
        ours = sum(ours_phases.get(o, 0.0) for o in OURS_FOR.get(k, ())) if k in OURS_FOR else None
        lines.append(f"  {k:14s} {ms(None if script is None else script / 1e3)} {ms(p.get(k))} {ms(ours)}")
    total = sum(p.values())
    lines.append(f"  {'step':14s} {ms(SCRIPT_STEP_MS / 1e3)} {ms(total)} {ms(ours_step)}")
    return lines
