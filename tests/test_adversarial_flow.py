"""The adversarial term on the flow family (tiny FLUX): token-pooled heads on the frozen transformer's
image tokens, every sample seen, the teacher's features, gradients to the student and the heads only, and
two real training steps."""

import functools

import lightning as L
import pytest
import torch

from tdd_lightning.data.synthetic import SyntheticDataModule
from tdd_lightning.models import get_family
from tdd_lightning.models.discriminator import Discriminator
from tdd_lightning.models.families.flux import FLUX, default_flux_sites
from tdd_lightning.models.features import FeatureTap
from tdd_lightning.models.flux_tiny import TinyFluxConfig, build_tiny_flux
from tdd_lightning.module import TDDModule
from tdd_lightning.strategies import EmbeddedGuidance, HingeAdversarial, PseudoHuberLoss, TDDSelection
from tests.test_module import perturb


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    # two double-stream blocks, so the default sites hold two of them and the last single-stream block
    return build_tiny_flux(
        tmp_path_factory.mktemp("flux-adv"), TinyFluxConfig(num_layers=2, guidance_embeds=True)
    )


def make_module(folder, lr=1e-3):
    m = TDDModule(
        model={"family": "flux", "pretrained": str(folder), "lora": {"rank": 4, "alpha": 8}},
        target_selection=TDDSelection(),
        guidance=EmbeddedGuidance(p_empty=0.25, w_min=0.0, w_max=3.0),
        loss=PseudoHuberLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr),
        ema_decay=0.5,
        adversarial=HingeAdversarial(norm_groups=4),
    )
    m.configure_model()
    return m


@pytest.fixture(scope="module")
def batch(flux_dir):
    dm = SyntheticDataModule(str(flux_dir), family="flux", num_samples=4, batch_size=4)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_default_sites_of_flux1_dev_and_the_tiny_model(flux_dir):
    double = ["transformer_blocks.5", "transformer_blocks.12", "transformer_blocks.18"]
    assert default_flux_sites(19, 38) == [*double, "single_transformer_blocks.37"]  # FLUX.1-dev
    bare = get_family("flux").load(flux_dir, load_vae=False, load_text_encoders=False).unet
    sites = FLUX.discriminator_sites(bare)
    assert [s.name for s in sites] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.1",
    ]
    assert all(s.layout == "tokens" and s.channels == 32 for s in sites)


def test_token_heads_read_the_image_tokens_of_every_sample(flux_dir, batch):
    bare = get_family("flux").load(flux_dir, load_vae=False, load_text_encoders=False).unet
    sites = FLUX.discriminator_sites(bare)
    tap, heads = FeatureTap(sites), Discriminator(sites, norm_groups=4)
    c = {k: v for k, v in FLUX.condition_from_batch(batch).items()} | {"guidance": torch.full((4,), 2.0)}
    x, t = batch["latents"].float(), torch.tensor([900.0, 500.0, 250.0, 10.0])
    moved = x.clone()
    moved[2] += torch.randn(moved[2].shape, generator=torch.Generator().manual_seed(0))  # sample 2 only
    with torch.no_grad():
        f, g = (
            tap.read(lambda: FLUX.denoise(bare, x, t, c)),
            tap.read(lambda: FLUX.denoise(bare, moved, t, c)),
        )
        before, after = heads(f), heads(g)
    tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
    assert all(feat.shape == (4, tokens, 32) for feat in f)  # image tokens, not the text tokens
    for b, a in zip(before, after, strict=True):
        assert b.shape == (4, 1)
        assert torch.equal(b[[0, 1, 3]], a[[0, 1, 3]]) and (b[2] - a[2]).abs().max() > 1e-6


def test_features_are_the_teachers_and_gradients_reach_only_the_student_and_the_heads(flux_dir, batch):
    m = make_module(flux_dir)
    bare = get_family("flux").load(flux_dir, load_vae=False, load_text_encoders=False).unet
    perturb(m.roles.student_params + m.roles.target_params)
    c = FLUX.condition_from_batch(batch) | {"guidance": torch.full((4,), 1.5)}
    x, t = batch["latents"].float(), torch.tensor([900.0, 500.0, 250.0, 10.0])
    reference = FeatureTap(FLUX.discriminator_sites(bare), truncate=False)
    with torch.no_grad():
        want = reference.read(lambda: FLUX.denoise(bare, x, t, c))
        got = m.teacher_features(x, t, c)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)

    out = m.distillation_loss(batch, torch.Generator().manual_seed(0))
    terms = m.adversarial_terms(out, torch.Generator().manual_seed(1))
    (out["loss"] + 0.1 * terms["g_loss"] + terms["d_loss"]).backward()
    student, heads = m.roles.student_params, list(m.discriminator.parameters())
    ids = {id(p) for p in student}
    others = [p for k, p in m.named_parameters() if id(p) not in ids and not k.startswith("discriminator.")]
    assert others and all(p.grad is None for p in others)  # base weights, target LoRA: nothing
    assert all(p.grad is not None for p in student + heads)


def test_two_training_steps_log_the_adversarial_terms(flux_dir, tmp_path):
    m = make_module(flux_dir)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(m, datamodule=SyntheticDataModule(str(flux_dir), family="flux", batch_size=4))
    assert trainer.global_step == 2 and len(seen) == 2
    for metrics in seen:
        for key in ("train/loss", "train/d_loss", "train/g_loss", "train/d_real", "train/d_fake"):
            assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
