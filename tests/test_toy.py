"""The toy benchmark's shipped parts: teacher pipeline, VAE and evaluator load and behave (fast)."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "toy-teacher"
EVALUATOR = ROOT / "models" / "toy-evaluator"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Fresh real two-object images (a seed the teacher and evaluator never saw)."""
    from tdd_lightning.data.shapes import ShapesConfig, make_shapes
    from tdd_lightning.toy.data import load_split

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, ShapesConfig(difficulty="two", train=0, heldout=400, shards=1, seed=12345))
    return load_split(out, "heldout")


@pytest.fixture(scope="module")
def evaluator():
    from tdd_lightning.toy.classifier import load_evaluator

    return load_evaluator(EVALUATOR)


@pytest.fixture(scope="module")
def teacher():
    from tdd_lightning.models import load_sdxl_components

    return load_sdxl_components(TEACHER)


def test_shipped_files_are_small():
    size = sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    weights = list(TEACHER.rglob("*.safetensors"))
    assert len(weights) == 4  # unet, vae, text_encoder, text_encoder_2 (fp16)
    assert sum(f.stat().st_size for f in EVALUATOR.rglob("*") if f.is_file()) <= 4 * 2**20


def test_teacher_loads_and_samples(teacher):
    from tdd_lightning.data.shapes import SHAPES_VOCAB
    from tdd_lightning.diffusion import NoiseSchedule, trailing_timesteps
    from tdd_lightning.toy.sampling import encode_prompts, initial_noise, sample_images

    assert teacher.unet.config.sample_size == 8 and teacher.vae.config.latent_channels == 4
    ids = teacher.tokenizer(" ".join(SHAPES_VOCAB)).input_ids
    assert len(ids) == len(SHAPES_VOCAB) + 2  # every word one token (plus BOS, EOS)
    cond = encode_prompts(teacher, ["a small red circle left of a large blue square"] * 2)
    schedule = NoiseSchedule.from_config(teacher.noise_scheduler.config)
    images = sample_images(
        teacher.unet, teacher.vae, cond, initial_noise(2, 0), trailing_timesteps(2), 2.0, schedule
    )
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


def test_vae_reconstructs(teacher, heldout):
    from tdd_lightning.toy.vae import psnr

    assert psnr(teacher.vae, heldout[0][:64]) > 20.0


def test_evaluator_scores_real_images(evaluator, heldout):
    from tdd_lightning.toy.data import labels_tensor
    from tdd_lightning.toy.metrics import classify

    pixels, attrs = heldout
    preds, _ = classify(evaluator, pixels)
    assert (preds == labels_tensor(attrs)).all(1).float().mean() >= 0.95


def test_evaluator_is_near_chance_on_noise(evaluator, heldout):
    from tdd_lightning.toy.data import HEADS, labels_tensor
    from tdd_lightning.toy.metrics import classify

    pixels, attrs = heldout
    noise = torch.randint(0, 256, pixels.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    preds, _ = classify(evaluator, noise)
    correct = preds == labels_tensor(attrs)
    assert correct.all(1).float().mean() <= 0.02
    for k, classes in enumerate(HEADS.values()):  # at most a constant guess of the commonest class
        assert correct[:, k].float().mean() <= 1 / len(classes) + 0.2


def test_frechet_distance_and_labels():
    from tdd_lightning.diffusion import trailing_timesteps
    from tdd_lightning.toy.data import canonical_labels
    from tdd_lightning.toy.metrics import frechet_distance

    f = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance(f, f)) < 1e-6
    assert frechet_distance(f, f + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(f, f[:100])
    a = {"shape": "circle", "color": "red", "size": "small"}
    b = {"shape": "square", "color": "blue", "size": "large"}
    left = canonical_labels({"relation": "left of", "objects": [a, b]})
    assert left == canonical_labels({"relation": "right of", "objects": [b, a]})
    assert left != canonical_labels({"relation": "above", "objects": [a, b]})
    assert trailing_timesteps(4) == [999, 749, 499, 249] and trailing_timesteps(1) == [999]


def test_toy_cfg_through_teacher_cfg_eps_is_bit_equal_to_its_own_batch(teacher):
    """The toy sampler's CFG now runs ``teacher_cfg_eps`` (same [conditional | unconditional] batch, same
    order): the eps and the images equal, to the bit, what the toy's own batching computed before."""
    from tdd_lightning.diffusion import NoiseSchedule
    from tdd_lightning.diffusion.sampling import tdd_sample
    from tdd_lightning.models.conditioning import teacher_cfg_eps, unconditional_like
    from tdd_lightning.models.families.sdxl import SDXL, unet_eps
    from tdd_lightning.toy.data import to_uint8
    from tdd_lightning.toy.sampling import (
        encode_prompts,
        initial_noise,
        renoise_seed,
        sample_images,
        trailing_timesteps,
    )

    unet, vae, g = teacher.unet, teacher.vae, 2.5
    captions = [
        "a small red circle left of a large blue square",
        "a large green cross above a small white cross",
    ]
    cond = encode_prompts(teacher, captions)
    schedule = NoiseSchedule.from_config(teacher.noise_scheduler.config)
    timesteps, x_T = trailing_timesteps(3), initial_noise(2, 7)

    def before(x, t):  # the toy's code before: its own [c | u] batch, then standard CFG
        u = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
        both = {k: torch.cat([cond[k], u[k]]) for k in cond}
        eps_c, eps_u = unet_eps(unet, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_u + g * (eps_c - eps_u)

    t = torch.full((2,), 749)
    eps_c, eps_u = teacher_cfg_eps(
        unet_eps, unet, x_T, t, cond, unconditional_like(cond, None, SDXL.text_keys), same=None
    )
    assert torch.equal(eps_u + g * (eps_c - eps_u), before(x_T, t))
    renoise = torch.Generator().manual_seed(renoise_seed(2))  # the re-noising stream of sampling seed 2
    x0 = tdd_sample(before, x_T, timesteps, schedule, eta=0.3, generator=renoise)
    old = to_uint8(vae.decode(x0 / vae.config.scaling_factor).sample)
    new = sample_images(unet, vae, cond, x_T, timesteps, g, schedule, eta=0.3, seed=2)
    assert torch.equal(new, old)
