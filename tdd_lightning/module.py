"""The TDD LightningModule: one base UNet holding teacher, student and EMA target (ALGORITHM.md 2)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from tdd_lightning.adversarial import AdversarialSteps
from tdd_lightning.checkpoint_io import GoodStates, check_lora_matches, checkpoint_path
from tdd_lightning.data.ranks import rank_and_world
from tdd_lightning.diffusion import (
    NoiseSchedule,
    add_noise,
    cfg_combine,
    check_prediction_type,
    ddim_jump,
    k_step_schedule,
    to_eps_x0,
)
from tdd_lightning.diffusion.ops import append_dims
from tdd_lightning.diffusion.sampling import guided, tdd_sample
from tdd_lightning.errors import ConfigError, UserError, check, check_int, check_number
from tdd_lightning.models.conditioning import replace_where
from tdd_lightning.models.config import ModelConfig
from tdd_lightning.models.dtypes import DTYPES
from tdd_lightning.models.families import get_family
from tdd_lightning.models.families.base import check_keys
from tdd_lightning.models.roles import STUDENT, TARGET, LoRARoles, grad_norm, warmup_decay
from tdd_lightning.models.w_conditioning import COND_PROJ, add_w_embedding, as_w_input
from tdd_lightning.strategies import (
    Adversarial,
    DistillationLoss,
    Guidance,
    NoAdversarial,
    TargetSelection,
    inference_hparams,
)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting (pinned when the target is a GPU)."""
    if x.device == torch.device(device):
        return x
    return (
        x.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else x.to(device)
    )


LOSS_SPACES = ("x_s", "x0")  # module.loss_on: what the loss compares (docs/ALGORITHM.md section 2, item 8)
MIN_STEPS_FOR_FRACTION = 20  # the skipped fraction is judged mid-run only after this many steps


# the scheduler-config keys training reads (noise schedule, prediction type) and those only a sampler
# uses (TDDScheduler honours them at inference): neither is reported as dropped
TRAINING_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "rescale_betas_zero_snr", "prediction_type", "clip_sample", "clip_sample_range", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value",
)  # fmt: skip


def schedule_from_config(family, config: Mapping[str, Any]) -> NoiseSchedule:
    """The family's training noise schedule; each key it cannot honour warns once, by name (rank 0)."""
    config = dict(config)
    defaults = set(config.get("_use_default_values", ()))  # a loader's class defaults, not the model's
    given = {k: v for k, v in config.items() if k not in defaults}
    for message in family.unhonoured_scheduler_keys(given, TRAINING_KEYS):
        rank_zero_warn(f"scheduler config: {message}")
    try:
        return family.noise_schedule(config)
    except ValueError as e:
        raise ConfigError("beta_schedule", config.get("beta_schedule"), str(e)) from None


class NonFiniteError(UserError):
    """Too many non-finite steps in a row; the message names the checkpoint of the last good state."""


class TDDModule(AdversarialSteps, L.LightningModule):
    """Consistency distillation with a pluggable target selection, guidance, loss and adversarial term.

    Args:
        model: where the base model lives and how the LoRA looks: a ``ModelConfig`` (every key and its
            default documented there), or a mapping of its keys (an unknown key is a ``ConfigError``).
        target_selection, guidance, loss: the strategies (Hydra groups of the same names).
        optimizer: a factory taking the student's LoRA parameters (Hydra ``_partial_``).
        lr_scheduler: a factory taking the optimizer, stepped every optimizer step (or None).
        ema_decay: the target's EMA decay over the student's LoRA tensors (0: the online student).
        eval_ema_decay: 0 (off) or the decay of a slow EMA of the student kept for evaluation and export
            only (LoRA role ``ema``, e.g. 0.999; warmed up by ``models.roles.warmup_decay``). It never
            enters the training step, so the student trains the same with it on or off.
        seed: with the global step, seeds each step's randomness (exact resume, world-size invariant).
        max_nonfinite_steps: stop (with a checkpoint of the last good state) after this many steps in a
            row whose loss or gradient was not finite; each such step is skipped and counted.
        adversarial: the adversarial term (Hydra group ``adversarial``; None or ``NoAdversarial``: off).
            When on, the step is ``adversarial.AdversarialSteps``'s (manual optimisation, two optimizers).
        loss_on: ``x_s`` (the method): the loss compares the student's and the target's points at s;
            ``x0``: it compares their x0 predictions (the student's at t, the target's at t') instead, an
            ablation (toy_convergence.md). The adversarial term always sees the points at s.
    """

    def __init__(
        self,
        model: ModelConfig | Mapping[str, Any],
        target_selection: TargetSelection,
        guidance: Guidance,
        loss: DistillationLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        ema_decay: float = 0.0,
        seed: int = 0,
        max_nonfinite_steps: int = 10,
        max_nonfinite_fraction: float = 0.1,
        snapshot_every: int = 100,
        eval_ema_decay: float = 0.0,
        adversarial: Adversarial | None = None,
        loss_on: str = "x_s",
    ):
        super().__init__()
        self.model_config = ModelConfig.coerce(model)
        self.family = get_family(self.model_config.family)
        check_number("ema_decay", ema_decay, 0.0, 1.0)
        check_number("eval_ema_decay", eval_ema_decay, 0.0, 1.0)
        check(eval_ema_decay < 1.0, "eval_ema_decay", eval_ema_decay, "must be 0 (off) or below 1")
        check_int("max_nonfinite_steps", max_nonfinite_steps)
        check_number("max_nonfinite_fraction", max_nonfinite_fraction, 0.0, 1.0)
        check_int("snapshot_every", snapshot_every)
        check(loss_on in LOSS_SPACES, "loss_on", loss_on, f"one of {', '.join(LOSS_SPACES)}")
        ema_decay, seed, max_nonfinite_steps = float(ema_decay), int(seed), int(max_nonfinite_steps)
        if ema_decay == 1.0:  # allowed (a frozen-target ablation), but almost always a slip for 0.999...
            rank_zero_warn("module.ema_decay=1.0: the EMA target never moves (it stays the initial LoRA)")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.max_nonfinite_fraction, self.snapshot_every = float(max_nonfinite_fraction), snapshot_every
        self.snapshots = GoodStates()
        self.nonfinite_total = self.nonfinite_in_a_row = 0
        self._skip_update = False
        self.target_selection, self.guidance, self.distill_loss = target_selection, guidance, loss
        self.adversarial = adversarial if adversarial is not None else NoAdversarial()
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.ema_decay, self.seed, self.eval_ema_decay = ema_decay, seed, float(eval_ema_decay)
        self.loss_on = loss_on
        self.save_hyperparameters(
            {
                "model": self.model_cfg,
                "target_selection": target_selection.describe(),
                "guidance": vars(guidance),
                "guidance_strategy": guidance.name,
                "loss": loss.describe(),
                "ema_decay": ema_decay,
                "eval_ema_decay": self.eval_ema_decay,
                "loss_on": loss_on,
                "seed": seed,
                **inference_hparams(target_selection, guidance),  # what the exported LoRA carries
                **({"adversarial": self.adversarial.describe()} if self.adversarial.enabled else {}),
            }
        )
        self.strict_loading = False  # checkpoints hold the LoRA tensors only, not the frozen base
        self.unet: torch.nn.Module | None = None
        self.roles: LoRARoles | None = None
        self.encoder = None
        self.uncond_text: dict[str, torch.Tensor] | None = None
        self.prediction_type = "epsilon"  # the teacher's, from its scheduler config (attach)
        self.last_times: dict[str, torch.Tensor] = {}
        self.discriminator, self.feature_tap = None, None  # the adversarial heads and their hooks (if on)

    @property
    def model_cfg(self) -> dict[str, Any]:
        """The model config as plain dicts (``ModelConfig.to_dict``): ``hyper_parameters.model``."""
        return self.model_config.to_dict()

    # ---- building ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the base UNet once and add the student and target LoRA adapters (FSDP2-friendly)."""
        if self.unet is not None:
            return
        cfg = self.model_config
        load_encoders = bool(cfg.load_encoders)
        parts = self.family.load(
            cfg.pretrained,
            revision=cfg.revision,
            variant=cfg.variant,
            dtype=DTYPES[cfg.base_dtype],
            load_vae=load_encoders,
            load_text_encoders=load_encoders,
        )
        self.attach(parts.unet, parts.noise_scheduler.config)
        if self.device_mesh is not None:  # ModelParallelStrategy (FSDP2): shard here, before the optimizer
            self.shard(self.device_mesh["data_parallel"])
        if load_encoders:
            self.encoder = self.family.encoder(parts)

    def attach(self, unet: torch.nn.Module, scheduler_config: Mapping[str, Any]) -> None:
        """Use ``unet`` as the base model (tests and notebooks call this directly).

        The noise schedule and prediction type come from ``scheduler_config`` (the model's own): eps, v or
        x0 prediction, ``rescale_betas_zero_snr`` honoured; a key training cannot honour warns by name.
        """
        cfg = self.model_config
        lora = cfg.lora
        self.family.check_unet(unet.config)
        self.family.check_guidance(unet.config, self.guidance.embedded)
        self.schedule = schedule_from_config(self.family, scheduler_config)
        if hasattr(self.schedule, "describe"):  # a flow model's shift: the export records it
            self.hparams["noise_schedule"] = self.schedule.describe()
        self.prediction_type = self.family.prediction_type(scheduler_config)
        try:
            check_prediction_type(self.prediction_type, self.schedule.terminal_abar)
        except ValueError as e:
            raise ConfigError("prediction_type", self.prediction_type, str(e)) from None
        self.unet = unet
        targets = list(lora.target_modules or self.family.lora_targets)
        if cfg.w_embedding_dim is not None:  # LCM-style w-conditioning: a zero w embedding, with a LoRA
            if not hasattr(unet, "time_embedding") or self.guidance.embedded:
                allowed = "a UNet family (sdxl, sd15) with guidance=decoupled or lcm_range"
                raise ConfigError("model.w_embedding_dim", cfg.w_embedding_dim, allowed)
            add_w_embedding(unet, int(cfg.w_embedding_dim))
            targets.append(COND_PROJ)
        with torch.random.fork_rng(devices=[]):  # LoRA init depends on the seed only, not on the code path
            torch.manual_seed(self.seed)
            self.roles = LoRARoles(
                unet,
                rank=int(lora.rank),
                alpha=lora.alpha,
                target_modules=targets,
                fused=bool(lora.fused),
                eval_ema=self.eval_ema_decay > 0,
            )
        # LoRA master weights stay fp32 even when the frozen base is bf16/fp16
        for p in self.roles.student_params + self.roles.target_params + self.roles.ema_params:
            p.data = p.data.float()
        if self.adversarial.enabled:
            self.build_discriminator(unet)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        if cfg.compile:
            unet.compile()  # in place: the roles keep switching the same (compiled) module
        if self.ema_decay > 0:
            self.roles.copy_student_to_target()

    def shard(self, mesh) -> None:
        """FSDP2: shard the base UNet per block (frozen and LoRA tensors alike); LoRA stays fp32."""
        from torch.distributed.fsdp import fully_shard

        unet = self.unet
        for block in self.family.fsdp_blocks(unet):
            fully_shard(block, mesh=mesh)
        fully_shard(unet, mesh=mesh)
        self.roles.collect_params()  # sharding replaced the parameter objects

    def setup(self, stage: str) -> None:
        self.configure_model()
        if self.adversarial.enabled:
            self.setup_adversarial()
        if self.guidance.uncond == "empty_prompt":
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            text = getattr(dm, "uncond", None)
            if text is None and self.encoder is not None:
                text = {k: v[0] for k, v in self.encoder.encode_captions([""]).items()}
            if text is None:
                raise ValueError(
                    "guidance.uncond=empty_prompt needs the encoded empty prompt: use cached data "
                    "(which stores it) or model.load_encoders=true"
                )
            check_keys(self.family, text, "the encoded empty prompt (uncond)")
            self.uncond_text = {k: text[k].float() for k in self.family.text_keys}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.roles.student_params)
        if self.adversarial.enabled:
            return self.adversarial_optimizers(optimizer)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- the training step (ALGORITHM.md section 2) -------------------------------------------------
    def step_generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """(host, device) generators for this step: a pure function of (seed, global step).

        Resume is exact, and draws are made for the global batch and sliced per rank (``world_slice``),
        so N processes with batch B compute what one process with batch N*B would. The small draws
        (dropout mask, w, t, s) come from the host generator, so no step ever waits on the GPU for them;
        the noise comes from the device generator.
        """
        seeds = []
        for role in ("host", "device"):
            key = f"{self.seed}/{self.global_step}/{role}".encode()
            seeds.append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        host = torch.Generator().manual_seed(seeds[0])
        on_device = torch.Generator(device=device).manual_seed(seeds[1])
        return host, on_device

    def world_slice(self, batch_size: int) -> tuple[int, slice]:
        """(global batch size, this rank's slice of it)."""
        rank, world = rank_and_world(self._trainer)
        return batch_size * world, slice(rank * batch_size, (rank + 1) * batch_size)

    def distillation_loss(
        self, batch: dict, generators: tuple[torch.Generator, torch.Generator] | torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One TDD step's loss for ``batch``; ``generators`` = (host, device), or one for both on the CPU."""
        roles, schedule, ts, family = self.roles, self.schedule, self.target_selection, self.family

        # 1. latents x0 and condition c (encoded on the fly only for raw batches)
        if "latents" not in batch:
            batch = self.encoder(batch)
        x0 = batch["latents"].float()
        c = family.condition_from_batch(batch)
        device = x0.device
        B_global, mine = self.world_slice(x0.shape[0])
        u = family.unconditional_like(c, self.uncond_text)

        host, on_device = (generators, generators) if isinstance(generators, torch.Generator) else generators

        # 2. guidance dropout: dropped samples use u for the student, the teacher and the target
        draw = self.guidance.draw(B_global, host)
        drop_host = draw.drop[mine]
        drop, w = to_device(drop_host, device), to_device(draw.w[mine], device)
        c = replace_where(drop, c, u)
        if self.guidance.embedded:  # w is the denoiser's guidance input, for teacher, student and target
            c = {**c, "guidance": w}
        c_w = {**c, "guidance": w} if self.model_config.w_embedding_dim else c  # w-conditioned LoRA roles

        # 3. start time t on the teacher grid, teacher end time t', noisy latent x_t
        t_global, t_prev_global = ts.sample_times(B_global, host)
        t, t_prev = to_device(t_global[mine], device), to_device(t_prev_global[mine], device)
        eps = torch.randn((B_global, *x0.shape[1:]), generator=on_device, device=device, dtype=x0.dtype)[mine]
        a_t, sigma_t = schedule.a_sigma(t, x0)
        x_t = add_noise(x0, eps, a_t, sigma_t)
        t_in, t_prev_in = schedule.model_time(t, x0), schedule.model_time(t_prev, x0)  # the denoiser's t

        # 4. target timestep s
        s = to_device(ts.select(t_prev_global, host)[mine], device)

        # 5. student (LoRA on, with gradients): its output as (eps, x0) at t, then the jump t -> s
        kind = self.prediction_type
        with roles.role(STUDENT) as unet:
            eps_s, x0_s = to_eps_x0(family.denoise(unet, x_t, t_in, c_w).float(), x_t, a_t, sigma_t, kind)
            pred = ts.consistency(x_t, eps_s, t, s, schedule, x0=x0_s)

        with torch.no_grad():
            # 6. teacher (adapters off): one DDIM step t -> t' with CFG, cond and uncond batched
            with roles.role("teacher") as unet:
                if self.guidance.uses_cfg:
                    out_c, out_u = family.cfg_outputs(unet, x_t, t_in, c, u, same=drop_host)
                    out = cfg_combine(out_c.float(), out_u.float(), append_dims(w, out_c.ndim))
                else:
                    out = family.denoise(unet, x_t, t_in, c).float()
            eps_teacher, x0_teacher = to_eps_x0(out, x_t, a_t, sigma_t, kind)  # linear: CFG commutes
            a_tp, sigma_tp = schedule.a_sigma(t_prev, x0)
            x_tp = ddim_jump(x_t, eps_teacher, a_t, sigma_t, a_tp, sigma_tp, x0=x0_teacher)

            # 7. target (EMA LoRA): jump t' -> s
            with roles.role(TARGET) as unet:
                out = family.denoise(unet, x_tp, t_prev_in, c_w).float()
                eps_tg, x0_tg = to_eps_x0(out, x_tp, a_tp, sigma_tp, kind)
                target = ts.consistency(x_tp, eps_tg, t_prev, s, schedule, x0=x0_tg)

        # 8. loss: on the points at s (the method), or on the two x0 predictions (an ablation)
        loss = self.distill_loss(pred, target) if self.loss_on == "x_s" else self.distill_loss(x0_s, x0_tg)
        out = {"loss": loss, "t": t, "s": s, "w": w, "dropped": drop, "x0_pred": x0_s, "x0_target": x0_tg}
        return out | {"pred": pred, "target": target, "cond": c}  # what the adversarial term reuses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.adversarial.enabled:
            return self.adversarial_training_step(batch)
        out = self.distillation_loss(batch, self.step_generators(self.device))
        self.log_step(out)
        return out["loss"]

    def log_step(self, out: dict) -> None:
        """The step's loss and its draws (``last_times``: t and s for the time-histogram callback)."""
        B = out["t"].shape[0]
        self.last_times = {"t": out["t"].detach(), "s": out["s"].detach()}
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=B)
        self.log_dict(
            {
                "train/w": out["w"].float().mean(),
                "train/dropped_frac": out["dropped"].float().mean(),
                "train/t_mean": out["t"].float().mean(),
                "train/s_mean": out["s"].float().mean(),
            },
            batch_size=B,
        )

    # ---- non-finite guard ---------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update (weights, optimizer state and EMA) when the loss or a gradient is not finite."""
        if not self.automatic_optimization:
            return  # the adversarial step guards both of its updates itself (skip_if_nonfinite)
        norm = grad_norm(self.roles.student_params)
        self.log("train/grad_norm", norm)  # before clipping
        self._skip_update = not bool(torch.isfinite(norm))  # the guard's one host sync per step
        if self._skip_update:
            for p in self.roles.student_params:
                p.grad = None  # AdamW leaves parameters without a gradient (and their state) untouched
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if not self._skip_update:
            self.update_emas()

    def update_emas(self) -> None:
        """The EMA target and the evaluation EMA, after each real optimizer step."""
        self.roles.update_target(self.ema_decay)
        if self.eval_ema_decay > 0:  # the decay is a function of the global step: resume-exact
            self.roles.update_eval_ema(warmup_decay(self.eval_ema_decay, self.global_step))

    def on_train_start(self) -> None:
        self.snapshots.take(self.trainer)  # the state before any update of this run

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step
        if self.nonfinite_in_a_row == 0 and step % self.snapshot_every == 0:
            self.snapshots.take(self.trainer)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            self.stop_nonfinite(
                f"{self.nonfinite_in_a_row} training steps in a row had a non-finite loss or gradient "
                f"(limit module.max_nonfinite_steps={self.max_nonfinite_steps})",
                streak_start=step - self.nonfinite_in_a_row,
            )
        if step >= MIN_STEPS_FOR_FRACTION:
            self.check_nonfinite_fraction()

    def on_train_end(self) -> None:
        if self.nonfinite_total >= 2:  # a short run is judged at its end (one skip alone is no pattern)
            self.check_nonfinite_fraction()

    def check_nonfinite_fraction(self) -> None:
        """Stop when more than ``max_nonfinite_fraction`` of all steps so far were skipped."""
        step = self.global_step
        if step and self.nonfinite_total / step > self.max_nonfinite_fraction:
            self.stop_nonfinite(
                f"{self.nonfinite_total} of {step} training steps were skipped as non-finite "
                f"(limit module.max_nonfinite_fraction={self.max_nonfinite_fraction:g})",
                streak_start=step - self.nonfinite_in_a_row,
            )

    def stop_nonfinite(self, reason: str, streak_start: int) -> None:
        """Write last_good.ckpt from the newest snapshot taken well before the trouble, then stop."""
        path = checkpoint_path(self.trainer, "last_good.ckpt")
        good = self.snapshots.before(streak_start)
        if good is not None:
            self.trainer.strategy.save_checkpoint(good, path)  # rank 0 writes
            where = f"the last good state (step {good['global_step']}, before the trouble) is in {path}"
        else:
            where = "no state from before the trouble was kept: restart from the last periodic checkpoint"
        raise NonFiniteError(
            f"{reason}; stopped at step {self.global_step}; {where}: lower the lr or check the data."
        )

    # ---- checkpoints hold LoRA tensors (and the adversarial heads) only ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if "lora_" in k or k.startswith("discriminator.")
        }
        checkpoint["tdd_lightning"] = {
            "lora": self.model_cfg["lora"],
            "nonfinite_total": self.nonfinite_total,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        check_lora_matches(checkpoint, self.model_cfg["lora"], self.state_dict())
        self.adversarial_resume(checkpoint)
        self.use_configured_lr(checkpoint)
        self.nonfinite_total = checkpoint.get("tdd_lightning", {}).get("nonfinite_total", 0)

    def use_configured_lr(self, checkpoint: dict) -> None:
        """A resume trains at the lr of the config, not the one saved with the optimizer state.

        Lightning restores the optimizer's param groups (lr included) and the schedule's base lr from the
        checkpoint, so resuming ``last_good.ckpt`` "with a lower lr" would silently keep the old one.
        """
        lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if lr is None:
            return
        student = checkpoint.get("optimizer_states", [])[:1]  # the adversarial heads' keep their own lr
        saved = [g.get("lr") for o in student for g in o.get("param_groups", [])]
        if not saved or all(v == lr for v in saved):
            return
        for o in student:
            for g in o.get("param_groups", []):
                g["lr"] = g["initial_lr"] = lr  # the schedule below rescales from here
        for sched in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in sched:
                sched["base_lrs"] = [lr] * len(sched["base_lrs"])
            if "_last_lr" in sched:
                sched["_last_lr"] = [lr] * len(sched["_last_lr"])
        rank_zero_warn(
            f"resuming with optimizer.lr={lr:g} from the config (the checkpoint was at {saved[0]:g})"
        )

    # ---- few-step sampling with the module's own maths --------------------------------------------
    @torch.no_grad()
    def sample_latents(
        self,
        cond: dict[str, torch.Tensor],
        num_steps: int = 4,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        role: str = STUDENT,
        timesteps: Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """K-step sampling from the training grid's schedule; standard CFG with u as the negative. With
        ``guidance=embedded`` a ``cond`` without ``guidance`` gets the strategy's recommended w; a
        w-conditioned student (``model.w_embedding_dim``) gets w = ``guidance_scale`` - 1 and no CFG."""
        unet, family, schedule = self.unet, self.family, self.schedule
        B = family.batch_size(cond)
        if latents is None:
            shape = family.sample_shape(unet, self.model_config.pretrained)
            latents = torch.randn((B, *shape), generator=generator, device=self.device)
        if timesteps is None:
            timesteps = k_step_schedule(num_steps, self.target_selection.N, schedule.num_train_timesteps)
        if self.guidance.embedded and "guidance" not in cond:
            w = self.guidance.recommended_guidance_scale()
            cond = {**cond, "guidance": torch.full((B,), w, device=latents.device)}
        cond, guidance_scale = as_w_input(unet, cond, guidance_scale, B, latents.device)
        u = family.unconditional_like(cond, self.uncond_text)

        def denoise(x, t, c):
            return family.denoise(unet, x, schedule.model_time(t, x), c)

        uncond_fn = (lambda x, t: denoise(x, t, u)) if guidance_scale != 1.0 else None
        out_fn = guided(lambda x, t: denoise(x, t, cond), uncond_fn, guidance_scale)
        with self.roles.role(role):
            return tdd_sample(
                out_fn,
                latents,
                timesteps,
                self.schedule,
                eta,
                generator,
                prediction_type=self.prediction_type,
                randn=family.randn_like,
            )
