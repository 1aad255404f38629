"""The tiny FLUX factory: a folder FluxPipeline loads and samples, with the contracts the flow family
relies on (packed latents, timestep = sigma, FLUX's dynamic shift at 16 tokens, (z - shift) * scale)."""

import math

import pytest
import torch

from tdd_lightning.errors import ConfigError
from tdd_lightning.models.flux_tiny import TinyFluxConfig, build_tiny_flux, build_tiny_flux_parts

WORDS = ["red", "circle", "small", "left", "of"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny", TinyFluxConfig(words=WORDS))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder)


def test_folder_loads_as_flux_pipeline(pipe):
    names = {k: type(v).__name__ for k, v in pipe.components.items() if v is not None}
    assert names == {
        "transformer": "FluxTransformer2DModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "T5Tokenizer",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 16
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.vae_scale_factor == 4  # 3 VAE levels: 32 px -> 8x8 latents -> 4x4 = 16 packed tokens
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 16


def test_two_step_generation_at_32px(pipe):
    kw = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="pt")
    a = pipe("a small red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a small red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # FLUX.1-dev's exponential shift with mu = base_shift = 0.5 at the base 16 tokens
    s = math.exp(0.5) * 0.5 / (1 + (math.exp(0.5) - 1) * 0.5)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, s, 0.0], abs=1e-6)


def test_one_step_is_euler_with_timestep_sigma(pipe):
    """The pipeline feeds timestep = sigma (t / 1000) and steps x + (sigma_next - sigma) v: at one step
    (sigma 1 -> 0) its latent is x - v(x, 1)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 16, generator=g)  # [B, tokens, 4 * channels]
    out = pipe(
        "a red circle", latents=x, num_inference_steps=1, height=32, width=32, max_sequence_length=16,
        output_type="latent",
    ).images  # fmt: skip
    emb, pooled, text_ids = pipe.encode_prompt("a red circle", prompt_2=None, max_sequence_length=16)
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, x.device, x.dtype)
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=x, timestep=torch.ones(1), pooled_projections=pooled, encoder_hidden_states=emb,
            txt_ids=text_ids, img_ids=img_ids, return_dict=False,
        )[0]  # fmt: skip
    torch.testing.assert_close(out, x - v)


def test_tokenizers_make_each_word_one_token(pipe):
    t5 = pipe.tokenizer_2("small red circle left of").input_ids
    assert len(t5) == 6 and t5[-1] == pipe.tokenizer_2.eos_token_id == 1  # 5 words + </s>, no BOS
    assert pipe.tokenizer_2.pad_token_id == 0
    clip = pipe.tokenizer("small red circle").input_ids
    assert len(clip) == 5  # BOS + 3 + EOS
    unknown = pipe.tokenizer_2("dog").input_ids  # outside the word list: characters
    assert pipe.tokenizer_2.convert_ids_to_tokens(unknown) == ["\u2581", "d", "o", "g", "</s>"]


def test_seeded_and_leaves_caller_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_tiny_flux_parts(TinyFluxConfig(seed=3))
    assert torch.equal(torch.get_rng_state(), before)
    b = build_tiny_flux_parts(TinyFluxConfig(seed=3))
    c = build_tiny_flux_parts(TinyFluxConfig(seed=4))
    pa, pb, pc = (next(iter(p.transformer.parameters())) for p in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_guidance_embeds_and_reused_vae(pipe):
    parts = build_tiny_flux_parts(TinyFluxConfig(guidance_embeds=True), vae=pipe.vae)
    assert parts.vae is pipe.vae and parts.transformer.config.guidance_embeds
    img = parts.to_pipeline()(
        "red", num_inference_steps=1, height=32, width=32, max_sequence_length=16, guidance_scale=3.0,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert img.shape == (1, 3, 32, 32)


def test_bad_sizes_fail_with_config_errors(pipe):
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        TinyFluxConfig(attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ConfigError, match="latent_channels"):
        build_tiny_flux_parts(TinyFluxConfig(latent_channels=16), vae=pipe.vae)
