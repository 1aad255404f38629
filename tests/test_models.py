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
