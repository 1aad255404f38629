"""TDDModule's adversarial training step (``adversarial=hinge``; ALGORITHM.md section 7), as a mixin.

One step, both updates. The step's student prediction and target (``TDDModule.distillation_loss``) feed
the discriminator update and the generator term, and ONE backward of

    loss + weight * g_loss + d_loss

gives both gradient sets: ``d_loss`` scores the fake features detached (no gradient reaches the student) and
the generator term scores them with the heads' parameters detached (no gradient reaches the heads). The
student's optimizer and the heads' Adam then step from that backward, with Lightning's manual optimisation
(two optimizers). Every step thus pays one student forward and backward, one teacher and one target forward
(as the plain step) plus two truncated teacher feature passes, the heads, and the generator's backward
through the frozen teacher; the reference code instead alternated discriminator and generator steps by
step parity, paying the full teacher and target forwards for each discriminator step.

The rest of the plain step is kept: gradient clipping (trainer.gradient_clip_val, applied here to the
student's and the heads' gradients alike), the non-finite guard (a non-finite loss, D or G loss, or
gradient skips both updates and is counted), the lr schedule (stepped every batch), the EMA target and the
evaluation EMA (after each real update). Gradient accumulation is refused at start-up.
"""

from __future__ import annotations

import hashlib
import warnings

import torch

from tdd_lightning.diffusion import renoise_coefficients
from tdd_lightning.errors import UserError
from tdd_lightning.models.discriminator import Discriminator
from tdd_lightning.models.features import FeatureTap
from tdd_lightning.models.roles import grad_norm
from tdd_lightning.strategies.adversarial import hinge_d_loss, hinge_g_loss, mean_logit
from tdd_lightning.strategies.base import uniform

SHARDED_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy")


class AdversarialSteps:
    """Methods of TDDModule for ``adversarial.enabled``; TDDModule calls them, nothing else does."""

    discriminator: Discriminator | None
    feature_tap: FeatureTap | None

    # ---- building ---------------------------------------------------------------------------------
    def build_discriminator(self, unet: torch.nn.Module) -> None:
        """The heads on the family's feature sites of ``unet``, and the hooks that read them.

        The heads' initial weights depend on the seed only (drawn in a forked RNG, after the LoRA's)."""
        adv = self.adversarial
        sites = self.family.discriminator_sites(unet, adv.features)
        self.feature_tap = FeatureTap(sites, truncate=adv.truncate and not self.model_config.compile)
        key = f"{self.seed}/discriminator".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.discriminator = Discriminator(sites, adv.norm_groups)

    def setup_adversarial(self) -> None:
        """Refuse what the manual step cannot honour; then switch to manual optimisation.

        Lightning refuses a Trainer's ``gradient_clip_val`` under manual optimisation at its configuration
        check, which runs before ``setup``: switching here keeps one clip setting for both kinds of step
        (the step clips by the trainer's value itself)."""
        trainer = self.trainer
        self.adversarial.check_trainer(trainer.accumulate_grad_batches, str(trainer.precision))
        if type(trainer.strategy).__name__ in SHARDED_STRATEGIES:
            self.feature_tap.truncate = False  # a sharded model's forward must run to its end
        self.automatic_optimization = False
        # ModelCheckpoint warns that a manual step's checkpoint holds the state after the update: so does
        # the automatic step's (both save at the end of the batch), so resume is exact either way
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

    def adversarial_optimizers(self, student_optimizer: torch.optim.Optimizer):
        """[student's, heads'] optimizers and the student's lr schedule (the heads keep a constant lr)."""
        optimizers = [student_optimizer, self.adversarial.optimizer(self.discriminator.parameters())]
        if self.lr_scheduler_factory is None:
            return optimizers
        return optimizers, [self.lr_scheduler_factory(optimizer=student_optimizer)]

    def adversarial_resume(self, checkpoint: dict) -> None:
        """A resume keeps the adversarial setting (heads and their optimizer in the checkpoint, or none);
        the heads train at the configured ``adversarial.lr``, not the one saved with their optimizer."""
        has_heads = any(k.startswith("discriminator.") for k in checkpoint.get("state_dict", {}))
        if has_heads == self.adversarial.enabled:
            for state in checkpoint.get("optimizer_states", [])[1:2] if has_heads else []:
                for group in state.get("param_groups", []):
                    group["lr"] = self.adversarial.lr
            return
        was, now = ("hinge", "none") if has_heads else ("none", self.adversarial.name)
        raise UserError(
            f"cannot resume: the checkpoint was trained with adversarial={was} "
            f"({'it holds' if has_heads else 'it has no'} discriminator heads and their optimizer) but the "
            f"config has adversarial={now}: resume with adversarial={was}"
        )

    # ---- the adversarial term ---------------------------------------------------------------------
    def teacher_features(self, x: torch.Tensor, t: torch.Tensor, c) -> list[torch.Tensor]:
        """The frozen teacher's (adapters off) features at the sites, for noisy latents ``x`` at ``t``."""
        with self.roles.role("teacher") as unet:
            return self.feature_tap.read(lambda: self.family.denoise(unet, x, t, c))

    def real_features(self, x, t, c) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.teacher_features(x, t, c)

    def fake_features(self, x, t, c) -> list[torch.Tensor]:
        return self.teacher_features(x, t, c)  # with gradients: the generator's path to the student

    def adversarial_terms(self, out: dict, generators) -> dict[str, torch.Tensor]:
        """d_loss, g_loss and the mean logits for the step's prediction and target (``distillation_loss``)."""
        adv, schedule, heads = self.adversarial, self.schedule, self.discriminator
        host, on_device = (generators, generators) if isinstance(generators, torch.Generator) else generators
        pred, target, c = out["pred"], out["target"], out["cond"]
        device = pred.device
        B_global, mine = self.world_slice(pred.shape[0])

        # real = the target, fake = the prediction, both moved from their time s on to t_gan with
        # independent noise (the draws are made for the global batch, as the step's others)
        s = self.target_selection.comparison_time(out["s"])
        u = uniform(B_global, host)[mine].to(device)
        t_gan = adv.t_gan(s, u, schedule.num_train_timesteps)
        z = torch.randn((2, B_global, *pred.shape[1:]), generator=on_device, device=device, dtype=pred.dtype)
        # any process x = a x0 + sigma eps (VP or flow): x_tgan = (a_tg / a_s) x_s + std z (ALGORITHM.md 8.3)
        scale, std = renoise_coefficients(*schedule.a_sigma(t_gan, pred), *schedule.a_sigma(s, pred))
        x_real = scale * target + std * z[0, mine]
        x_fake = scale * pred + std * z[1, mine]

        # the frozen teacher's features of both; the heads score them
        t_in = schedule.model_time(t_gan, pred)  # the timestep the denoiser is given (a flow model: sigma T)
        f_real = self.real_features(x_real, t_in, c)
        f_fake = self.fake_features(x_fake, t_in, c)
        d_real = heads(f_real)
        d_fake = heads([f.detach() for f in f_fake])  # the discriminator's term: no gradient to the student
        frozen = {n: p.detach() for n, p in heads.named_parameters()}
        g_fake = torch.func.functional_call(heads, frozen, (f_fake,))  # the generator's: none to the heads
        return {
            "d_loss": hinge_d_loss(d_real, d_fake),
            "g_loss": hinge_g_loss(g_fake),
            "d_real": mean_logit(d_real).detach(),
            "d_fake": mean_logit(d_fake).detach(),
            "t_gan": t_gan,
        }

    # ---- one step, both updates -------------------------------------------------------------------
    def adversarial_training_step(self, batch: dict) -> torch.Tensor:
        adv = self.adversarial
        opt_student, opt_heads = self.optimizers()
        generators = self.step_generators(self.device)
        out = self.distillation_loss(batch, generators)
        active = adv.active(self.global_step)
        if active:
            terms = self.adversarial_terms(out, generators)
            total = out["loss"] + adv.weight * terms["g_loss"] + terms["d_loss"]
            checked = [out["loss"], terms["d_loss"], terms["g_loss"]]
        else:  # warm-up: consistency only; the heads join with zero gradients (DDP expects every parameter)
            terms = {}
            total = out["loss"] + 0.0 * sum(p.sum() for p in self.discriminator.parameters())
            checked = [out["loss"]]
        opt_student.zero_grad()
        opt_heads.zero_grad()
        self.manual_backward(total)
        self.average_head_grads()
        skip = self.skip_if_nonfinite(checked)
        if not skip:
            self.clip_gradients(opt_student)
            self.clip_gradients(opt_heads)
        opt_student.step()  # Lightning counts the optimizer step here (global_step + 1), skipped or not
        if active and not skip:
            opt_heads.optimizer.step()  # the bare optimizer: one counted step per batch, not two
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # every batch, as the automatic step's "interval: step"
        if not skip:
            self.update_emas()
        self.log_step(out)
        if active:
            self.log_dict(
                {f"train/{k}": terms[k] for k in ("d_loss", "g_loss", "d_real", "d_fake")},
                batch_size=out["t"].shape[0],
            )
        return out["loss"].detach()

    def average_head_grads(self) -> None:
        """Sharded data parallel (FSDP2): average the heads' gradients over the ranks (the heads are not
        sharded; under DDP its reducer averages them with the student's)."""
        mesh = self.device_mesh
        if mesh is None:
            return
        import torch.distributed as dist

        grads = [p.grad for p in self.discriminator.parameters() if p.grad is not None]
        if not grads:
            return
        group = mesh["data_parallel"].get_group()
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def skip_if_nonfinite(self, losses: list[torch.Tensor]) -> bool:
        """The guard of both updates: a non-finite loss or gradient skips the whole step, counted."""
        student = grad_norm(self.roles.student_params)
        heads = grad_norm(list(self.discriminator.parameters()))
        self.log("train/grad_norm", student)  # before clipping
        self.log("train/d_grad_norm", heads)
        values = torch.stack([student, heads.to(student), *(v.detach().float().to(student) for v in losses)])
        skip = not bool(torch.isfinite(values).all())  # the guard's one host sync per step
        if skip:
            for p in [*self.roles.student_params, *self.discriminator.parameters()]:
                p.grad = None
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        else:
            self.nonfinite_in_a_row = 0
        self.log("train/nonfinite_skipped", float(self.nonfinite_total))
        return skip
