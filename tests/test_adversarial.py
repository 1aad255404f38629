"""The adversarial term (issue 18): hinge maths by hand, the heads and hooked features, one step with both
updates (which gradient goes where), the guard, checkpoints and export, resume after kill -9, DDP/FSDP2."""

from __future__ import annotations

import csv
import functools
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.diffusion import renoise_coefficients
from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.export import export_lora
from tdd_lightning.models import load_sdxl_components
from tdd_lightning.models.discriminator import Discriminator, Head
from tdd_lightning.models.families.sd15 import SD15
from tdd_lightning.models.families.sdxl import SDXL, unet_eps
from tdd_lightning.models.features import FeatureTap
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import (
    DecoupledGuidance,
    HingeAdversarial,
    LCMSelection,
    NoAdversarial,
    PCMSelection,
    PseudoHuberLoss,
    TDDSelection,
)
from tdd_lightning.strategies.adversarial import hinge_d_loss, hinge_g_loss
from tdd_lightning.training.run import check_config, train
from tests.hydra_utils import compose_cfg, smoke_overrides
from tests.test_module import cond_of, perturb
from tests.test_robustness import start, wait_for


# ---- the maths, by hand -------------------------------------------------------------------------------
def test_renoise_by_hand():
    # VP, abar_t = 0.2, abar_s = 0.8: scale = sqrt(0.2 / 0.8) = 0.5, std = sqrt(0.8 - 0.25 * 0.2) = sqrt(0.75)
    a_t, sigma_t, a_s, sigma_s = (torch.tensor([v]).sqrt() for v in (0.2, 0.8, 0.8, 0.2))
    scale, std = renoise_coefficients(a_t, sigma_t, a_s, sigma_s)
    assert (scale * 2.0 + std * 1.0).item() == pytest.approx(1.0 + 0.75**0.5, abs=1e-6)
    # flow, sigma_t = 0.6, sigma_s = 0.2: scale = 0.4 / 0.8 = 0.5, std = sqrt(0.36 - 0.01)
    scale, std = renoise_coefficients(*(torch.tensor([v]) for v in (0.4, 0.6, 0.8, 0.2)))
    assert scale.item() == pytest.approx(0.5) and std.item() == pytest.approx(0.35**0.5)
    scale, std = renoise_coefficients(a_s, sigma_s, a_s, sigma_s)  # t = s: unchanged
    assert scale.item() == pytest.approx(1.0) and std.item() == pytest.approx(0.0, abs=1e-3)


def test_t_gan_window_by_hand():
    adv = HingeAdversarial(k_min=4)  # T / K_min = 250
    s, u = torch.tensor([0, 100, 900, 600]), torch.tensor([0.0, 0.5, 0.9999, 0.999])
    assert adv.t_gan(s, u, 1000).tolist() == [0, 225, 999, 849]  # 900: window cut at T, 999 at most


def test_hinge_losses_by_hand():
    real = [torch.tensor([2.0, 0.5]), torch.tensor([[0.0]])]
    fake = [torch.tensor([-2.0, 0.0]), torch.tensor([[1.0]])]
    # head 1: mean(relu(1 - [2, .5])) = .25, mean(relu(1 + [-2, 0])) = .5; head 2: 1 + 2; mean of heads
    assert hinge_d_loss(real, fake).item() == pytest.approx((0.75 + 3.0) / 2)
    assert hinge_g_loss(fake).item() == pytest.approx((1.0 - 1.0) / 2)  # -mean: 1 and -1


@pytest.mark.parametrize("change, message", [
    ("adversarial.weight=-1", "adversarial.weight=-1"),
    ("adversarial.k_min=0", "adversarial.k_min=0"),
    ("adversarial.betas=[0.0,1.5]", "adversarial.betas="),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 is not supported"),
    ("trainer.precision=16-mixed", "not 16-mixed"),
])  # fmt: skip
def test_bad_settings_fail_at_startup(change, message, tiny_sdxl_dir, tmp_path):
    cfg = compose_cfg(smoke_overrides(tiny_sdxl_dir, "adversarial=hinge", change), tmp_path)
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        check_config(cfg)


def test_the_window_follows_target_selection_k_min(tmp_path):
    assert compose_cfg(["adversarial=hinge", "target_selection.k_min=5"], tmp_path).adversarial.k_min == 5
    assert compose_cfg(["adversarial=hinge", "target_selection=pcm"], tmp_path).adversarial.k_min == 4


# ---- the heads and the features ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_unet(tiny_sdxl_dir):
    return load_sdxl_components(tiny_sdxl_dir, load_vae=False, load_text_encoders=False).unet


def test_heads_see_every_sample(bare_unet):
    sites = SDXL.discriminator_sites(bare_unet)
    assert [s.name for s in sites] == ["down_blocks.0", "down_blocks.1", "mid_block"]
    heads = Discriminator(sites)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(4, s.channels, 6, 6, generator=g) for s in sites]
    moved = [f.clone() for f in feats]
    for f in moved:
        f[2] += torch.randn(f[2].shape, generator=g)  # sample 2 only
    with torch.no_grad():
        before, after = heads(feats), heads(moved)
    for b, a in zip(before, after, strict=True):
        assert b.shape == (4, 1, 6, 6)
        assert torch.equal(b[[0, 1, 3]], a[[0, 1, 3]]) and (b[2] - a[2]).abs().max() > 1e-4


def test_token_heads_see_every_sample_and_pool_the_tokens():
    head = Head(16, layout="tokens", norm_groups=4)
    x = torch.randn(3, 10, 16)  # [B, L, C]
    moved = x.clone()
    moved[1, 4] += 1.0
    with torch.no_grad():
        before, after = head(x), head(moved)
    assert before.shape == (3, 1)
    assert torch.equal(before[[0, 2]], after[[0, 2]]) and (before[1] - after[1]).abs().max() > 1e-5


def test_site_names_select_and_unknown_names_are_refused(bare_unet):
    assert [s.name for s in SDXL.discriminator_sites(bare_unet, ["mid_block"])] == ["mid_block"]
    with pytest.raises(ConfigError, match="adversarial.features.*has the sites down_blocks.0, down_blocks.1"):
        SDXL.discriminator_sites(bare_unet, ["up_blocks.0"])


def make_module(pretrained, adversarial=None, selection=None, optimizer=None, ema_decay=0.5, **adv):
    m = TDDModule(
        model={"pretrained": str(pretrained), "lora": {"rank": 4}},
        target_selection=selection or TDDSelection(),
        guidance=DecoupledGuidance(p_empty=0.5),
        loss=PseudoHuberLoss(),
        optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=1e-3),
        ema_decay=ema_decay,
        adversarial=adversarial if adversarial is not None else HingeAdversarial(**adv),
    )
    m.configure_model()
    return m


@pytest.fixture(scope="module")
def batch(synthetic_batch4):
    return synthetic_batch4


def test_hooked_features_are_the_teachers(tiny_sdxl_dir, bare_unet, batch):
    """Adapters off: the features equal a forward of the bare base model; the student's differ."""
    m = make_module(tiny_sdxl_dir)
    perturb(m.roles.student_params)  # the student is no longer the teacher
    x, t, c = batch["latents"], torch.tensor([999, 500, 250, 3]), cond_of(batch)
    reference = FeatureTap(SDXL.discriminator_sites(bare_unet), truncate=False)
    with torch.no_grad():
        want = reference.read(lambda: unet_eps(bare_unet, x, t, c))
        got = m.teacher_features(x, t, c)  # truncated after the mid block
        m.feature_tap.truncate = False
        full = m.teacher_features(x, t, c)
        student = m.feature_tap.read(lambda: unet_eps(m.unet, x, t, c))
    reference.remove()
    for w, g, f, s in zip(want, got, full, student, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        assert torch.equal(g, f)  # truncation changes nothing before the last site
        assert (s - w).abs().max() > 1e-4
    assert m.roles.active == "student"  # the role is restored after a (stopped) feature pass
    with torch.no_grad():
        plain = unet_eps(m.unet, x, t, c)  # outside a read the hooks do nothing: the UNet runs to its end
    assert plain.shape == x.shape


def test_gradients_reach_only_the_student_and_the_heads(tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir)
    perturb(m.roles.student_params + m.roles.target_params)
    out = m.distillation_loss(batch, torch.Generator().manual_seed(0))
    terms = m.adversarial_terms(out, torch.Generator().manual_seed(1))
    student, heads = m.roles.student_params, list(m.discriminator.parameters())

    def grads(loss):
        return torch.autograd.grad(loss, student + heads, allow_unused=True, retain_graph=True)

    def moved(gs):
        return sum(float(g.abs().sum()) for g in gs if g is not None)

    d, g = grads(terms["d_loss"]), grads(terms["g_loss"])
    n = len(student)
    assert all(x is None for x in d[:n]) and moved(d[n:]) > 0  # the discriminator's term: heads only
    assert all(x is None for x in g[n:]) and moved(g[:n]) > 0  # the generator's: the student only
    (out["loss"] + 0.1 * terms["g_loss"] + terms["d_loss"]).backward()
    ids = {id(p) for p in student}
    others = [p for k, p in m.named_parameters() if id(p) not in ids and not k.startswith("discriminator.")]
    assert others and all(p.grad is None for p in others)  # base weights, target LoRA: nothing
    assert all(p.grad is not None for p in student + heads)


@pytest.mark.parametrize("selection", [PCMSelection(), LCMSelection()], ids=["pcm", "lcm"])
def test_composes_with_other_target_selections(selection, tiny_sdxl_dir, batch):
    m = make_module(tiny_sdxl_dir, selection=selection)
    out = m.distillation_loss(batch, torch.Generator().manual_seed(0))
    terms = m.adversarial_terms(out, torch.Generator().manual_seed(1))
    assert torch.isfinite(terms["d_loss"]) and torch.isfinite(terms["g_loss"])
    if isinstance(selection, LCMSelection):  # its points are x0 estimates: re-noised from time 0
        assert int(terms["t_gan"].max()) < 1000 // 4


def test_sd15_hooks_its_down_and_mid_blocks(tiny_sd15_dir):
    from tdd_lightning.models import load_sd15_components

    unet = load_sd15_components(tiny_sd15_dir, load_vae=False, load_text_encoders=False).unet
    sites = SD15.discriminator_sites(unet)
    assert [s.name for s in sites][-1] == "mid_block" and len(sites) == len(unet.down_blocks) + 1
    tap = FeatureTap(sites)
    x = torch.randn(2, unet.config.in_channels, 16, 16)
    c = {"prompt_embeds": torch.randn(2, 77, unet.config.cross_attention_dim)}
    with torch.no_grad():
        feats = tap.read(lambda: SD15.denoise(unet, x, torch.tensor([10, 500]), c))
    assert [f.shape[1] for f in feats] == [s.channels for s in sites] and all(f.shape[0] == 2 for f in feats)


# ---- one step, both updates ---------------------------------------------------------------------------
class Snapshots(L.Callback):
    """Student, target and heads after every step, and the step's logged metrics."""

    def __init__(self):
        self.student, self.target, self.heads, self.metrics = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.student.append([p.detach().clone() for p in pl_module.roles.student_params])
        self.target.append([p.detach().clone() for p in pl_module.roles.target_params])
        heads = pl_module.discriminator
        self.heads.append([p.detach().clone() for p in heads.parameters()] if heads is not None else [])
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, tiny_sdxl_dir, steps, clip=1.0):
    snaps = Snapshots()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, gradient_clip_val=clip,
                        callbacks=[snaps])  # fmt: skip
    trainer.fit(module, datamodule=SyntheticDataModule(str(tiny_sdxl_dir), num_samples=16, batch_size=2))
    return snaps, trainer


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_discriminator_update_leaves_the_student_alone(tiny_sdxl_dir):
    """Weight 0: the student trains bit for bit as with adversarial=none (the plain automatic step), and
    with its clipping, schedule and EMA target; the heads do train."""
    plain, _ = fit(make_module(tiny_sdxl_dir, adversarial=NoAdversarial()), tiny_sdxl_dir, 3)
    adv, trainer = fit(make_module(tiny_sdxl_dir, weight=0.0), tiny_sdxl_dir, 3)
    assert trainer.global_step == 3  # one counted step per batch with two optimizers
    for step in range(3):
        assert same(adv.student[step], plain.student[step]) and same(adv.target[step], plain.target[step])
    assert not same(adv.heads[0], adv.heads[1])
    for k in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "train/d_grad_norm"):
        assert k in adv.metrics[-1], k
    assert adv.metrics[-1]["train/grad_norm"] == pytest.approx(plain.metrics[-1]["train/grad_norm"], rel=1e-6)


def test_the_generator_term_leaves_the_heads_alone(tiny_sdxl_dir):
    """After one step the heads are the same whatever the generator's weight; the student is not."""
    small, _ = fit(make_module(tiny_sdxl_dir, weight=0.1), tiny_sdxl_dir, 1)
    large, _ = fit(make_module(tiny_sdxl_dir, weight=10.0), tiny_sdxl_dir, 1)
    assert same(small.heads[0], large.heads[0])
    assert not same(small.student[0], large.student[0])


def test_warmup_is_consistency_only(tiny_sdxl_dir):
    plain, _ = fit(make_module(tiny_sdxl_dir, adversarial=NoAdversarial()), tiny_sdxl_dir, 3)
    warm, _ = fit(make_module(tiny_sdxl_dir, warmup_steps=2), tiny_sdxl_dir, 3)
    initial = [p.detach().clone() for p in make_module(tiny_sdxl_dir).discriminator.parameters()]
    for step in range(2):
        assert same(warm.student[step], plain.student[step]) and same(warm.heads[step], initial)
        assert "train/d_loss" not in warm.metrics[step]
    assert not same(warm.heads[2], initial) and not same(warm.student[2], plain.student[2])
    assert "train/d_loss" in warm.metrics[2]


def test_gradient_clipping_clips_the_student(tiny_sdxl_dir):
    # SGD with lr 1: the update is minus the clipped gradient, so its norm is the clip value
    sgd = functools.partial(torch.optim.SGD, lr=1.0)
    m = make_module(tiny_sdxl_dir, optimizer=sgd)
    before = [p.detach().clone() for p in m.roles.student_params]
    snaps, _ = fit(m, tiny_sdxl_dir, 1, clip=1e-4)
    delta = torch.cat([(a - b).flatten() for a, b in zip(snaps.student[0], before, strict=True)])
    assert snaps.metrics[0]["train/grad_norm"] > 1e-3
    assert delta.norm().item() == pytest.approx(1e-4, rel=1e-3)


def test_a_nonfinite_discriminator_loss_skips_both_updates(tiny_sdxl_dir):
    m = make_module(tiny_sdxl_dir)
    terms = m.adversarial_terms

    def nan_at_step_1(out, generators):
        result = terms(out, generators)
        if m.global_step == 1:
            result["d_loss"] = result["d_loss"] * float("nan")
        return result

    m.adversarial_terms = nan_at_step_1
    snaps, trainer = fit(m, tiny_sdxl_dir, 3)
    assert trainer.global_step == 3 and m.nonfinite_total == 1
    assert same(snaps.student[1], snaps.student[0]) and same(snaps.heads[1], snaps.heads[0])
    assert same(snaps.target[1], snaps.target[0])  # no EMA update either
    assert not same(snaps.student[2], snaps.student[1]) and not same(snaps.heads[2], snaps.heads[1])
    assert snaps.metrics[1]["train/nonfinite_skipped"] == 1.0


# ---- state: checkpoints, export, resume -----------------------------------------------------------
@pytest.fixture(scope="module")
def adversarial_run(tiny_sdxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adv-run")
    train(compose_cfg(smoke_overrides(tiny_sdxl_dir, "adversarial=hinge"), out))
    return out


def test_checkpoints_hold_the_heads_and_their_optimizer_but_exports_do_not(adversarial_run, tmp_path):
    from safetensors import safe_open

    ckpt = torch.load(adversarial_run / "checkpoints" / "last.ckpt", weights_only=False)
    heads = [k for k in ckpt["state_dict"] if k.startswith("discriminator.")]
    assert heads and len(ckpt["optimizer_states"]) == 2
    assert ckpt["optimizer_states"][1]["param_groups"][0]["lr"] == 1e-5
    assert ckpt["hyper_parameters"]["adversarial"]["name"] == "hinge"
    files = export_lora(ckpt, tmp_path / "lora")
    assert files
    for path in files.values():
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        assert keys and not any("discriminator" in k or "heads" in k for k in keys)


def test_a_resume_keeps_the_adversarial_setting(adversarial_run, tiny_sdxl_dir, tmp_path):
    ckpt = adversarial_run / "checkpoints" / "last.ckpt"
    resume = smoke_overrides(tiny_sdxl_dir, "trainer.max_steps=4", f"ckpt_path={ckpt}")
    with pytest.raises(UserError, match="trained with adversarial=hinge .* resume with adversarial=hinge"):
        train(compose_cfg(resume, tmp_path / "plain"))
    metrics = train(compose_cfg([*resume, "adversarial=hinge", "adversarial.lr=3e-5"], tmp_path / "adv"))
    assert metrics["global_step"] == 4 and "train/d_loss" in metrics
    again = torch.load(tmp_path / "adv" / "checkpoints" / "last.ckpt", weights_only=False)
    assert again["optimizer_states"][1]["param_groups"][0]["lr"] == 3e-5  # the configured lr, not the saved


def logged(out: Path, key: str) -> dict[int, float]:
    rows = csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open())
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.slow
def test_exact_resume_after_kill_9(tiny_sdxl_dir, tmp_path):
    """Per-step consistency, D and G losses of a run killed and resumed equal those of a straight run."""
    adv = ("adversarial=hinge", "data.batch_size=2")
    killed = tmp_path / "killed"
    proc = start(tiny_sdxl_dir, killed, *adv, "trainer.max_steps=100000",
                 "callbacks.model_checkpoint.every_n_train_steps=3")  # fmt: skip
    wait_for(killed / "checkpoints" / "step_0000006.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = killed / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(ckpt, weights_only=False)["global_step"]
    stop = resumed_from + 4
    resumed, full = tmp_path / "resumed", tmp_path / "full"
    r = start(tiny_sdxl_dir, resumed, *adv, f"trainer.max_steps={stop}", f"ckpt_path={ckpt}")
    f = start(tiny_sdxl_dir, full, *adv, f"trainer.max_steps={stop}")
    assert r.wait(timeout=300) == 0, r.stdout.read()[-3000:]
    assert f.wait(timeout=300) == 0, f.stdout.read()[-3000:]
    for key in ("train/loss", "train/d_loss", "train/g_loss"):
        got, want = logged(resumed, key), logged(full, key)
        assert sorted(got) == list(range(resumed_from, stop)), key
        for step, value in got.items():
            assert value == pytest.approx(want[step], rel=1e-6, abs=1e-9), (key, step)


# ---- distributed ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tiny_sdxl_dir, tmp_path):
    from tests.test_distributed import compare
    from tests.test_distributed import fit as fit_distributed

    fit_distributed(tiny_sdxl_dir, tmp_path, "single", 1, "auto", adversarial=True)
    fit_distributed(tiny_sdxl_dir, tmp_path, "ddp", 2, "ddp_fork", adversarial=True)
    single = torch.load(tmp_path / "single_rank0.pt")
    r0, r1 = torch.load(tmp_path / "ddp_rank0.pt"), torch.load(tmp_path / "ddp_rank1.pt")
    assert compare(r0["lora"], r1["lora"], atol=0) == 0 and compare(r0["heads"], r1["heads"], atol=0) == 0
    compare(single["lora"], r0["lora"])
    compare(single["heads"], r0["heads"], atol=1e-5)
    initial = make_module(tiny_sdxl_dir).discriminator.state_dict()
    assert compare(initial, single["heads"], atol=float("inf")) > 1e-7  # the heads really trained


@pytest.mark.slow
def test_fsdp2_two_processes_equal_ddp(tiny_sdxl_dir, tmp_path):
    from tests.test_distributed import compare, fit_in_subprocess
    from tests.test_distributed import fit as fit_distributed

    fit_distributed(tiny_sdxl_dir, tmp_path, "ddp", 2, "ddp_fork", adversarial=True)
    fit_in_subprocess(tiny_sdxl_dir, tmp_path, "fsdp", "fsdp2", "--adversarial")
    ddp, fsdp = torch.load(tmp_path / "ddp_rank0.pt"), torch.load(tmp_path / "fsdp_rank0.pt")
    compare(ddp["lora"], fsdp["lora"], atol=1e-4)
    compare(ddp["heads"], fsdp["heads"], atol=1e-5)


# ---- the benchmark ----------------------------------------------------------------------------------
def test_bench_prints_the_adversarial_step_next_to_the_plain_one(tiny_sdxl_dir, tmp_path):
    from tdd_lightning.bench.build import BenchConfig
    from tdd_lightning.bench.report import format_report
    from tdd_lightning.bench.runner import ALL_PHASES, run_bench

    cfg = BenchConfig(pretrained=str(tiny_sdxl_dir), batch=2, rank=4, warmup=1, steps=2, naive_steps=0,
                      adversarial="hinge")  # fmt: skip
    r = run_bench(cfg, tmp_path)
    a = r["adversarial"]
    assert set(a["phases_mean_s"]) == set(ALL_PHASES)
    assert sum(a["phases_mean_s"].values()) == pytest.approx(a["step_mean_s"], rel=1e-6)
    for k in ("adv real fwd", "adv fake fwd", "heads", "adv bwd"):
        assert a["phases_mean_s"][k] > 0, k
    assert a["teacher_batch_mean"] == r["teacher_batch_mean"]  # the same draws; feature passes not counted
    text = format_report(r)
    assert "adversarial=hinge: the step with the adversarial term" in text
    assert "adv fake fwd" in text and "x the plain step" in text and "adv_ratio=" in text.splitlines()[-1]
