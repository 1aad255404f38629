"""The tiny SDXL factory round-trips through the real loader; hub ids fail fast offline."""

import time

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from tdd_lightning.models import ModelNotFoundError, load_sdxl_components
from tdd_lightning.models.tokenizer import make_clip_tokenizer


def test_loaded_weights_equal_saved(tiny_sdxl_dir, tiny_components):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = tiny_components.unet.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert tiny_components.unet.config.addition_embed_type == "text_time"
    assert tiny_components.unet.config.cross_attention_dim == (
        tiny_components.text_encoder.config.hidden_size + tiny_components.text_encoder_2.config.hidden_size
    )


def test_stock_pipeline_two_steps_is_deterministic(tiny_components):
    pipe = tiny_components.to_pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.set_progress_bar_config(disable=True)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return pipe("a red circle", num_inference_steps=2, generator=g, output_type="pt").images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_loader_can_skip_encoders(tiny_sdxl_dir):
    c = load_sdxl_components(tiny_sdxl_dir, load_vae=False, load_text_encoders=False)
    assert c.vae is None and c.text_encoder is None and c.unet is not None
    assert not any(p.requires_grad for p in c.unet.parameters())


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="local diffusers folder"):
        load_sdxl_components("stabilityai/stable-diffusion-xl-base-1.0")
    assert time.monotonic() - start < 10


def test_missing_folder_and_non_sdxl_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_sdxl_components(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="missing unet"):
        load_sdxl_components(tmp_path)


def test_tokenizer_words_are_single_tokens():
    words = ["bottom", "bot", "circle", "red", "left", "above", "abo"]  # shared prefixes and pairs
    tok = make_clip_tokenizer(words)
    assert tok.tokenize("a red circle at the bottom left")[1:3] == ["red</w>", "circle</w>"]
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"]
    ids = tok("red", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id


def test_square_time_ids_of_an_uncropped_square_image():
    from tdd_lightning.models.families.sdxl import square_time_ids

    ids = square_time_ids(1024, 3)
    expected = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 3)
    assert ids.dtype == torch.float32 and ids.is_contiguous() and torch.equal(ids, expected)
    assert square_time_ids(32, 1, device="cpu").tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    assert square_time_ids(8, 0).shape == (0, 6)


def test_components_to_pipeline_uses_the_parts(tiny_components):
    from diffusers import DDIMScheduler

    pipe = tiny_components.to_pipeline()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(pipe, name) is getattr(tiny_components, name), name
    assert pipe.scheduler is tiny_components.noise_scheduler
    other = DDIMScheduler.from_config(tiny_components.noise_scheduler.config)
    assert tiny_components.to_pipeline(scheduler=other).scheduler is other


def test_tiny_pipeline_is_seeded(tmp_path):
    """The tiny factory builds through SDXLComponents.to_pipeline: same seed, same weights; another seed,
    other weights (the build order of the parts fixes which draws each part gets)."""
    from safetensors.torch import load_file

    from tdd_lightning.models.tiny import TinySDXLConfig, build_tiny_sdxl

    def weights(out, seed):
        build_tiny_sdxl(out, TinySDXLConfig.from_channels([8, 16], sample_size=4, seed=seed))
        return {
            p: load_file(str(next((out / p).glob("*.safetensors")))) for p in ("unet", "vae", "text_encoder")
        }

    a, b, c = weights(tmp_path / "a", 0), weights(tmp_path / "b", 0), weights(tmp_path / "c", 1)
    for part in a:
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
        assert not all(torch.equal(a[part][k], c[part][k]) for k in a[part]), part
