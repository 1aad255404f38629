"""The toy flow teacher's pieces: packing, FluxPipeline's Euler schedule and true CFG reproduced by the
batched sampler, the rectified-flow training loop, and the builder end to end on tiny data."""

import json
import math

import pytest
import torch

from tdd_lightning.models.flux_tiny import TinyFluxConfig, build_tiny_flux_parts
from tdd_lightning.toy.flow_sampling import (
    encode_flow_prompts,
    euler_flow,
    euler_sigmas,
    image_ids,
    pack,
    scheduler_mu,
    unpack,
)
from tdd_lightning.toy.flow_teacher import FlowTeacherConfig, sample_sigmas, train_flow_teacher, velocity

CAPTIONS = [
    "",
    "a small red circle left of a large blue square",
    "a large green cross above a small white triangle",
]


@pytest.fixture(scope="module")
def pipe():
    from tdd_lightning.data.shapes import SHAPES_VOCAB

    return build_tiny_flux_parts(TinyFluxConfig(words=SHAPES_VOCAB, text_length=12)).to_pipeline()


def test_pack_and_ids_match_flux_pipeline(pipe):
    z = torch.randn(2, 4, 8, 8)
    x = pack(z)
    torch.testing.assert_close(x, pipe._pack_latents(z, 2, 4, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack(x, 8, 8), z, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(8, 8), pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))


def test_schedule_matches_flux_pipeline(pipe):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = pipe.scheduler.config
    mu = scheduler_mu(c, 16)
    ref = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert mu == pytest.approx(ref) and mu == pytest.approx(0.5)
    assert scheduler_mu(c, 256) == pytest.approx(1.15)
    for k in (1, 4, 50):
        pipe.scheduler.set_timesteps(sigmas=list(torch.linspace(1, 1 / k, k).numpy()), mu=mu)
        torch.testing.assert_close(euler_sigmas(k, mu), pipe.scheduler.sigmas.float())
    assert scheduler_mu({"use_dynamic_shifting": False, "shift": 3.0}, 16) == pytest.approx(math.log(3.0))


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_euler_flow_is_flux_pipeline_with_true_cfg(pipe, guidance):
    """The batched sampler equals FluxPipeline (``true_cfg_scale`` against the negative prompt "")."""
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(negative_prompt=["", ""], true_cfg_scale=guidance) if guidance > 1 else {}
    ref = pipe(
        CAPTIONS[1:], latents=x, num_inference_steps=3, height=32, width=32, max_sequence_length=12,
        output_type="latent", **kw,
    ).images  # fmt: skip
    text = encode_flow_prompts(pipe, CAPTIONS, 8)
    mu = scheduler_mu(pipe.scheduler.config, 16)
    out = euler_flow(pipe.transformer, text, torch.tensor([1, 2]), 0, x, 3, guidance, mu)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_training_sigmas_follow_the_shifted_logit_normal():
    s = sample_sigmas(20000, FlowTeacherConfig(mu=0.5), torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1
    median = math.exp(0.5) * 0.5 / (1 + (math.exp(0.5) - 1) * 0.5)  # the shift of u's median 0.5
    assert s.median().item() == pytest.approx(median, abs=0.01)


def test_training_lowers_the_flow_loss_and_drops_captions_to_empty(pipe):
    text = encode_flow_prompts(pipe, CAPTIONS, 8)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 16, 16, generator=g) * 0.5 + 0.3
    index = torch.tensor([1, 2, 1, 2])
    eps, sigma = torch.randn(x0.shape, generator=g), torch.full((4,), 0.6)
    x_t = 0.4 * x0 + 0.6 * eps
    transformer = build_tiny_flux_parts(TinyFluxConfig(words=["red"], text_length=12, seed=2)).transformer

    def loss(model):
        with torch.no_grad():
            return (velocity(model, x_t, sigma, text.select(index)) - (eps - x0)).pow(2).mean().item()

    before = loss(transformer)
    cfg = FlowTeacherConfig(steps=40, batch_size=4, lr=3e-3, warmup=1, ema_decay=0.9)
    ema, avg = train_flow_teacher(transformer, x0, index, text, 0, cfg, progress=False)
    assert loss(transformer) < 0.7 * before and math.isfinite(avg)
    assert loss(ema) < before and not ema.training and ema is not transformer

    seen = []
    text_spy = type(text)(text.prompt_embeds, text.pooled, text.text_ids, text.img_ids)
    text_spy.select = lambda j: seen.append(j.clone()) or text.select(j)
    one = FlowTeacherConfig(steps=2, batch_size=4, p_uncond=1.0, warmup=1)
    train_flow_teacher(transformer, x0, index, text_spy, 0, one, progress=False)
    assert all((j == 0).all() for j in seen)  # every caption dropped to "" (row 0)


@pytest.mark.slow
def test_builder_writes_a_flux_pipeline_folder(tmp_path):
    from diffusers import FluxPipeline

    from tdd_lightning.data.shapes import ShapesConfig, make_shapes
    from tdd_lightning.toy.build_flow_teacher import main

    data = tmp_path / "shapes"
    make_shapes(data, ShapesConfig(difficulty="two", train=48, heldout=0, shards=1, seed=3))
    out = tmp_path / "flow"
    args = ["--data", str(data), "--out", str(out), "--steps", "2", "--batch", "4", "--layers", "1"]
    args += ["--single-layers", "1", "--heads", "2", "--head-dim", "16", "--no-progress", "--log-every", "1"]
    info = main(args)
    assert info["transformer"]["train_images"] == 48 and info["transformer"]["steps"] == 2
    assert json.loads((out / "build_info.json").read_text())["command"].endswith("--log-every 1")
    from safetensors import safe_open

    with safe_open(next((out / "transformer").glob("*.safetensors")), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    p = FluxPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert p.transformer.config.axes_dims_rope == [4, 6, 6]
    assert p.vae.config.shift_factor == pytest.approx(info["vae"]["shift_factor"])
    assert p.tokenizer_2.model_max_length == 12
    img = p(
        "a red circle", num_inference_steps=1, height=32, width=32, max_sequence_length=12, output_type="pt"
    )
    assert img.images.shape == (1, 3, 32, 32)

    # a later stage continues the transformer with the same text encoders and VAE (new seed: new batches)
    later = tmp_path / "flow2"
    info2 = main(args[:3] + [str(later), "--init", str(out), "--seed", "1"] + args[4:])
    assert (
        info2["init"]["command"] == info["command"]
        and info2["vae"]["shift_factor"] == info["vae"]["shift_factor"]
    )
    assert info2["flux"] == json.loads(json.dumps(info["flux"]))
    q = FluxPipeline.from_pretrained(later, torch_dtype=torch.float32)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(p, name).state_dict(), getattr(q, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    t1, t2 = p.transformer.state_dict(), q.transformer.state_dict()
    assert any(not torch.equal(t1[k], t2[k]) for k in t1)
