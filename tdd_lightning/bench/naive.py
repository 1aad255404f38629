"""The naive step: the same algorithm written the way the common LCM-LoRA scripts write it.

Differences from TDDModule's step, each one a cost those scripts pay:
- pixels and captions are encoded every step (VAE + both text encoders), no cached latents;
- the teacher's conditional and unconditional branches are two forwards of B each (also for samples
  whose caption was dropped, whose two branches are identical);
- roles are switched with peft's own APIs (``set_adapter``, ``disable_adapters``/``enable_adapters``,
  which also rewrite ``requires_grad`` on every LoRA tensor) and LoRA layers run peft's forward;
- a plain training loop: ``clip_grad_norm_``, AdamW, an EMA as a Python loop over tensors, and the
  loss read with ``.item()`` every step for logging.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from tdd_lightning.diffusion import add_noise, append_dims, cfg_combine, ddim_jump
from tdd_lightning.models.conditioning import replace_where, square_time_ids, unet_eps
from tdd_lightning.models.roles import STUDENT, TARGET


class NaiveTrainer:
    """Runs naive steps on the module's UNet and adapters (restores the module's role state after)."""

    def __init__(self, module, encoder, batch_size: int, device: torch.device, num_samples: int = 32, seed=0):
        self.m, self.encoder, self.B, self.device = module, encoder, batch_size, device
        roles = module.roles
        self.fused_before = roles.fused
        self.params = roles.student_params
        self.optimizer = module.optimizer_factory(params=self.params)
        g = torch.Generator().manual_seed(seed)
        side = 8 * module.unet.config.sample_size
        self.pixels = (torch.rand(num_samples, 3, side, side, generator=g) * 2 - 1).to(device)
        self.captions = [f"synthetic sample {i}" for i in range(num_samples)]
        self.time_ids = square_time_ids(side, batch_size, device)
        self.i = 0

    def batch(self):
        n = self.pixels.shape[0]
        idx = [(self.i * self.B + k) % n for k in range(self.B)]
        self.i += 1
        return self.pixels[idx], [self.captions[k] for k in idx], self.time_ids

    def step(self, context=None) -> float:
        m, unet, B, device = self.m, self.m.unet, self.B, self.device
        ts, schedule = m.target_selection, m.schedule
        g = torch.Generator(device=device).manual_seed(1000 + self.i)
        pixels, captions, time_ids = self.batch()
        with context or nullcontext():
            # 1. encode every step
            with torch.no_grad():
                x0 = self.encoder.encode_images(pixels, sample=True, generator=g)
                prompt_embeds, pooled = self.encoder.encode_text(captions)
            c = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "time_ids": time_ids}
            u = {
                **c,
                "prompt_embeds": torch.zeros_like(prompt_embeds),
                "pooled_prompt_embeds": torch.zeros_like(pooled),
            }
            draw = m.guidance.draw(B, g, device)
            c = replace_where(draw.drop, c, u)
            t, t_prev = ts.sample_times(B, g, device)
            eps = torch.randn(x0.shape, generator=g, device=device)
            a_t, sigma_t = schedule.a_sigma(t, x0)
            x_t = add_noise(x0, eps, a_t, sigma_t)
            s = ts.select(t_prev, g)
            # student
            unet.set_adapter(STUDENT)
            pred = ts.consistency(x_t, unet_eps(unet, x_t, t, c).float(), t, s, schedule)
            with torch.no_grad():
                # teacher: adapters off, cond and uncond as two forwards
                unet.disable_adapters()
                eps_c = unet_eps(unet, x_t, t, c).float()
                eps_u = unet_eps(unet, x_t, t, u).float()
                unet.enable_adapters()
                eps_teacher = cfg_combine(eps_c, eps_u, append_dims(draw.w, eps_c.ndim))
                a_tp, sigma_tp = schedule.a_sigma(t_prev, x0)
                x_tp = ddim_jump(x_t, eps_teacher, a_t, sigma_t, a_tp, sigma_tp)
                # target
                unet.set_adapter(TARGET)
                target = ts.consistency(x_tp, unet_eps(unet, x_tp, t_prev, c).float(), t_prev, s, schedule)
                unet.set_adapter(STUDENT)  # peft: the student trainable again, the target frozen
            loss = m.distill_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = m.ema_decay
            for tp, sp in zip(m.roles.target_params, self.params, strict=True):
                tp.mul_(d).add_(sp, alpha=1.0 - d)
        return loss.item()

    def enter(self) -> None:
        """peft's own LoRA forward for the naive steps (call ``exit`` before the module trains again)."""
        self.m.roles.set_fused(False)

    def exit(self) -> None:
        """Back to the module's own role handling."""
        roles = self.m.roles
        roles.set_fused(self.fused_before)
        roles.use(STUDENT)
        for p in roles.student_params:
            p.requires_grad_(True)
        for p in roles.target_params:
            p.requires_grad_(False)
