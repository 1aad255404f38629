"""Sample grids during training: fixed prompts and seeds, a few step counts, from rank 0.

Rows are prompts, columns are step counts. The text encoders encode the fixed prompts once at the
start of fit and are then dropped; the VAE stays for decoding. Under sharded strategies (FSDP) every
rank samples (each forward needs all ranks) and rank 0 writes the grid. Grids go to
``<out>/samples/`` as PNG and to wandb when it is a logger.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tdd_lightning.errors import check, check_int, check_ints, check_number
from tdd_lightning.models.encoder import decode_latents
from tdd_lightning.plotting import label_grid


class SampleGrid(L.Callback):
    def __init__(
        self,
        prompts: list[str],
        steps: list[int] = (1, 2, 4, 8),
        seed: int = 0,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        every_n_steps: int = 500,
        out_dir: str | None = None,
        role: str = "student",
    ):
        check(all(isinstance(q, str) for q in prompts), "prompts", prompts, "must be a list of strings")
        self.prompts, self.steps = list(prompts), check_ints("steps", steps)
        self.seed = check_int("seed", seed, 0)
        self.eta = check_number("eta", eta, 0.0, 1.0)
        self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        check(role in ("student", "target"), "role", role, "must be student or target")
        self.out_dir, self.role = out_dir, role
        self.cond = None
        self.vae = None

    @staticmethod
    def sharded(trainer) -> bool:
        """Under FSDP every rank must join each forward: all ranks sample, rank 0 saves."""
        return type(trainer.strategy).__name__ in (
            "FSDPStrategy",
            "ModelParallelStrategy",
            "DeepSpeedStrategy",
        )

    def on_fit_start(self, trainer, pl_module):
        if not self.prompts or not (trainer.is_global_zero or self.sharded(trainer)):
            return
        family = pl_module.family
        parts = family.load(pl_module.model_cfg["pretrained"], load_vae=True, load_text_encoders=True)
        text = family.encoder(parts).encode_captions(self.prompts)
        scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        size = family.sample_shape(pl_module.unet, pl_module.model_cfg["pretrained"])[-1] * scale
        self.cond = family.condition(text, family.square_geometry(size, len(self.prompts)))
        self.vae = parts.vae

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.cond is None or step == 0 or step % self.every_n_steps:
            return
        self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.cond is not None:
            self.render(trainer, pl_module)

    @torch.no_grad()
    def render(self, trainer, pl_module) -> Path | None:
        device = pl_module.device
        cond = {k: v.to(device) for k, v in self.cond.items()}
        vae = self.vae.to(device)
        columns = []
        for k in self.steps:
            g = torch.Generator(device=device).manual_seed(self.seed)
            latents = pl_module.sample_latents(
                cond,
                num_steps=k,
                eta=self.eta,
                guidance_scale=self.guidance_scale,
                generator=g,
                role=self.role,
            )
            images = decode_latents(vae, latents)
            columns.append((images.float().clamp(-1, 1) + 1) / 2)
        if not trainer.is_global_zero:
            return None
        grid = label_grid(columns, [f"{k} steps" for k in self.steps], self.prompts)
        out = Path(self.out_dir or trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{trainer.global_step:07d}.png"
        grid.save(path)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [str(path)], step=trainer.global_step)
        return path
