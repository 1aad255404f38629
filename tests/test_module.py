"""The LightningModule: roles on one UNet, batched CFG, EMA, clipping, and that the step learns."""

import functools

import lightning as L
import pytest
import torch

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.models import load_sdxl_components
from tdd_lightning.models.conditioning import teacher_cfg_eps, unconditional_like
from tdd_lightning.models.families.sdxl import SDXL, unet_eps
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import DecoupledGuidance, LCMSelection, PseudoHuberLoss, TDDSelection


def make_module(tiny_sdxl_dir, guidance=None, selection=None, ema_decay=0.0, optimizer=None, rank=4):
    m = TDDModule(
        model={"pretrained": str(tiny_sdxl_dir), "lora": {"rank": rank}},
        target_selection=selection or TDDSelection(),
        guidance=guidance or DecoupledGuidance(),
        loss=PseudoHuberLoss(),
        optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=1e-3),
        ema_decay=ema_decay,
    )
    m.configure_model()
    return m


def perturb(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def batch(tiny_sdxl_dir):
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=6, batch_size=6)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def cond_of(batch):
    return {k: batch[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids")}


def test_teacher_is_the_base_unet_and_only_student_trains(tiny_sdxl_dir, batch):
    base = load_sdxl_components(tiny_sdxl_dir, load_vae=False, load_text_encoders=False).unet
    m = make_module(tiny_sdxl_dir)
    perturb(m.roles.student_params + m.roles.target_params)  # make both adapters non-trivial
    x, t = batch["latents"], torch.tensor([999, 751, 499, 251, 127, 3])
    with torch.no_grad():
        ref = unet_eps(base, x, t, cond_of(batch))
        with m.roles.role("teacher") as unet:
            teacher = unet_eps(unet, x, t, cond_of(batch))
        student = unet_eps(m.unet, x, t, cond_of(batch))
        with m.roles.role("target") as unet:
            target = unet_eps(unet, x, t, cond_of(batch))
    torch.testing.assert_close(teacher, ref, rtol=0, atol=1e-6)
    assert (student - ref).abs().max() > 1e-3 and (target - student).abs().max() > 1e-3
    trainable = [p for p in m.unet.parameters() if p.requires_grad]
    assert len(trainable) == len(m.roles.student_params) > 0
    assert {id(p) for p in trainable} == {id(p) for p in m.roles.student_params}
    # switching roles never changes the trainable set (peft's set_adapter would)
    with m.roles.role("target"):
        assert all(p.requires_grad for p in m.roles.student_params)
        assert not any(p.requires_grad for p in m.roles.target_params)


def test_ema_decay_zero_copies_and_one_holds(tiny_sdxl_dir):
    m = make_module(tiny_sdxl_dir)
    perturb(m.roles.student_params)
    before = [p.clone() for p in m.roles.target_params]
    m.roles.update_target(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, m.roles.target_params, strict=True))
    m.roles.update_target(0.0)
    assert all(torch.equal(a, b) for a, b in zip(m.roles.student_params, m.roles.target_params, strict=True))
    perturb(m.roles.student_params, seed=1)
    old = [p.clone() for p in m.roles.target_params]
    m.roles.update_target(0.9)
    for o, tgt, s in zip(old, m.roles.target_params, m.roles.student_params, strict=True):
        torch.testing.assert_close(tgt, 0.9 * o + 0.1 * s)


def test_batched_cfg_equals_two_separate_calls(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir)
    x, t, c = batch["latents"], torch.tensor([999, 751, 499, 251, 127, 3]), cond_of(batch)
    u = unconditional_like(c, None, SDXL.text_keys)
    with torch.no_grad(), m.roles.role("teacher") as unet:
        eps_c, eps_u = teacher_cfg_eps(unet_eps, unet, x, t, c, u, same=None)
        torch.testing.assert_close(eps_c, unet_eps(unet, x, t, c), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(eps_u, unet_eps(unet, x, t, u), rtol=1e-4, atol=1e-5)
        # samples already unconditional are computed once: their eps_u equals their eps_c
        same = torch.tensor([True, False, True, False, False, True])
        calls = []
        handle = unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
        eps_c2, eps_u2 = teacher_cfg_eps(unet_eps, unet, x, t, c, u, same=same)
        handle.remove()
    assert calls == [6 + 3]  # one forward of B + (B - dropped)
    torch.testing.assert_close(eps_u2[same], eps_c2[same])
    torch.testing.assert_close(eps_u2[~same], eps_u[~same], rtol=1e-4, atol=1e-5)


def test_dropped_samples_use_the_same_uncond_everywhere(tiny_sdxl_dir, batch):
    """With p_empty = 1 every UNet call (student, teacher, target) sees u, and the teacher runs B only."""
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=6, batch_size=6)
    dm.setup()
    m = make_module(tiny_sdxl_dir, guidance=DecoupledGuidance(p_empty=1.0, uncond="empty_prompt"))
    m.uncond_text = dm.uncond
    seen = []
    handle = m.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    m.distillation_loss(batch, torch.Generator().manual_seed(0))
    handle.remove()
    assert len(seen) == 3 and [s.shape[0] for s in seen] == [6, 6, 6]
    for s in seen:
        torch.testing.assert_close(s, dm.uncond["prompt_embeds"].expand_as(s))


def test_step_learns_on_a_fixed_batch(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir, optimizer=functools.partial(torch.optim.AdamW, lr=2e-3))
    opt = m.configure_optimizers()
    losses = []
    for _ in range(150):
        out = m.distillation_loss(batch, torch.Generator().manual_seed(7))  # the same problem each step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        m.roles.update_target(0.0)
        losses.append(out["loss"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_lcm_parameterisation_runs(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir, selection=LCMSelection())
    out = m.distillation_loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and torch.equal(out["s"], (out["t"] - 20).clamp(min=0))


def _fit_one_step(tiny_sdxl_dir, clip):
    dm = SyntheticDataModule(str(tiny_sdxl_dir), num_samples=4, batch_size=4)
    m = make_module(tiny_sdxl_dir, optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    perturb(m.roles.student_params)  # non-zero LoRA B: every LoRA tensor gets a gradient
    before = [p.detach().clone() for p in m.roles.student_params]
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, gradient_clip_val=clip,
    )  # fmt: skip
    trainer.fit(m, datamodule=dm)
    delta = torch.stack(
        [(p.detach() - b).norm() for p, b in zip(m.roles.student_params, before, strict=True)]
    )
    return delta.norm().item()


def test_gradient_clipping_really_clips(tiny_sdxl_dir):
    # SGD with lr 1: the update is minus the (clipped) gradient, so its norm is the gradient's norm
    unclipped = _fit_one_step(tiny_sdxl_dir, clip=None)
    clipped = _fit_one_step(tiny_sdxl_dir, clip=1e-4)
    assert unclipped > 1e-3
    assert clipped == pytest.approx(1e-4, rel=1e-3)


def test_loss_on_x0_compares_the_x0_predictions(tiny_sdxl_dir, batch):
    """loss_on=x0: the loss is the student's x0 at t against the target's at t', by hand from the UNet
    outputs; the same seed with loss_on=x_s gives the points at s, which differ from the x0s."""
    m = make_module(tiny_sdxl_dir)
    perturb(m.roles.student_params + m.roles.target_params)
    calls = []
    handle = m.unet.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((args[0], args[1], out.sample)), with_kwargs=True
    )
    m.loss_on = "x0"
    out = m.distillation_loss(batch, torch.Generator().manual_seed(3))
    handle.remove()
    (x_t, t_in, eps_student), _, (x_tp, tp_in, eps_target) = calls  # student, teacher (CFG batched), target
    a_t, sigma_t = m.schedule.a_sigma(out["t"], x_t)
    x0_by_hand = (x_t - sigma_t * eps_student) / a_t
    torch.testing.assert_close(out["x0_pred"], x0_by_hand, rtol=1e-5, atol=1e-5)
    t_prev = (out["t"] - m.target_selection.k).clamp(min=0)
    a_tp, sigma_tp = m.schedule.a_sigma(t_prev, x_tp)
    torch.testing.assert_close(out["x0_target"], (x_tp - sigma_tp * eps_target) / a_tp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], PseudoHuberLoss()(x0_by_hand, out["x0_target"]))
    m.loss_on = "x_s"
    same = m.distillation_loss(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(same["loss"], PseudoHuberLoss()(same["pred"], same["target"]))
    assert (same["loss"] - out["loss"]).abs() > 1e-4


def test_loss_on_must_be_a_known_space(tiny_sdxl_dir):
    with pytest.raises(Exception, match="loss_on"):
        TDDModule(
            model={"pretrained": str(tiny_sdxl_dir)},
            target_selection=TDDSelection(),
            guidance=DecoupledGuidance(),
            loss=PseudoHuberLoss(),
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
            loss_on="eps",
        )
