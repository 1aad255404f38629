"""SDXLEncoder matches diffusers; the offline cache gives the latents and embeddings of online encoding."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tdd_lightning.data.datamodule import ShardDataModule
from tdd_lightning.data.encode import main as encode_main
from tdd_lightning.data.shards import ShardWriter
from tdd_lightning.models.families.sdxl import SDXLEncoder


def png(seed: int, h: int, w: int) -> bytes:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def gather(loader) -> dict:
    batches = list(loader)
    return {
        k: torch.cat([b[k] for b in batches])
        if k not in ("key", "caption")
        else sum((b[k] for b in batches), [])
        for k in batches[0]
    }


@pytest.fixture(scope="module")
def encoder(tiny_components):
    return SDXLEncoder.from_components(tiny_components)


def test_encode_text_matches_the_sdxl_pipeline(tiny_components, encoder):
    captions = ["a small red circle left of a large blue square", ""]
    prompt_embeds, pooled = encoder.encode_text(captions)
    pipe = tiny_components.to_pipeline()
    ref, _, ref_pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert prompt_embeds.dtype == pooled.dtype == torch.float32
    torch.testing.assert_close(prompt_embeds, ref, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    assert not torch.equal(prompt_embeds[0], prompt_embeds[1])  # "" is encoded, not zeroed


def test_encode_images_mode_is_deterministic_and_scaled(tiny_components, encoder):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    a, b = encoder.encode_images(pixels), encoder.encode_images(pixels)
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)
    vae = tiny_components.vae
    expected = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(a, expected, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(encoder.encode_images(pixels, sample=True, generator=g), a)
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="VAE"):
        SDXLEncoder.from_components(
            type(tiny_components)(tiny_components.unet, None, None, None, None, None, None)
        )


def test_cached_shards_equal_online_encoding(tmp_path, tiny_sdxl_dir, encoder, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(3):
        with ShardWriter(raw / f"s-{s:06d}.tar") as w:  # 72 x 96: resized to 64 x 85, cropped to 64 x 64
            for i in range(4):
                w.write(f"s{s}-{i}", {"png": png(10 * s + i, 72, 96), "txt": f"caption {s} {i}".encode()})
    with ShardWriter(raw / "s-000003.tar") as w:  # one bad sample: skipped and counted, not cached
        w.write("broken", {"png": b"garbage", "txt": b"x"})
        w.write("ok", {"png": png(5, 64, 64), "txt": b""})
    out = tmp_path / "cache"
    meta = encode_main(
        [str(raw / "s-{000000..000003}.tar"), str(out), "--model", str(tiny_sdxl_dir), "--batch-size", "5"]
    )
    assert "wrote 13 samples in 4 shard(s)" in capsys.readouterr().out
    assert meta["skipped"] == {"image": 1} and meta["latent_shape"] == [4, 8, 8]
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "s-000000.tar",
        "s-000001.tar",
        "s-000002.tar",
        "s-000003.tar",
        "uncond.safetensors",
    ]
    assert json.loads((out / "meta.json").read_text())["samples"] == 13

    cached = ShardDataModule(str(out / "s-*.tar"), mode="cached", batch_size=16, num_workers=2)
    cached.setup("fit")
    c = gather(cached.train_dataloader())
    online_dm = ShardDataModule(
        str(raw / "s-*.tar"), batch_size=16, num_workers=0, resolution=64, center_crop=True
    )
    online_dm.setup("fit")
    r = gather(online_dm.train_dataloader())
    o = encoder(r)

    assert c["latents"].dtype == c["prompt_embeds"].dtype == torch.float32
    assert c["latents"].shape == (13, 4, 8, 8) and c["prompt_embeds"].shape == (13, 77, 64)
    assert c["pooled_prompt_embeds"].shape == (13, 32) and c["time_ids"].shape == (13, 6)
    ci, oi = np.argsort(c["key"]), np.argsort(o["key"])
    assert [c["key"][i] for i in ci] == [o["key"][i] for i in oi]
    assert [c["caption"][i] for i in ci] == [o["caption"][i] for i in oi]
    # stored fp16: the online result rounded to fp16 (within one fp16 ulp: batch composition may
    # change the last bits of a convolution on some backends)
    for k in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(c[k][ci], o[k][oi].half().float(), rtol=2**-10, atol=1e-6)
    torch.testing.assert_close(c["time_ids"][ci], o["time_ids"][oi], rtol=0, atol=0)
    ids = dict(zip(c["key"], c["time_ids"].tolist(), strict=True))
    assert ids["s0-0"] == [72, 96, 0, 10, 64, 64] and ids["ok"] == [64, 64, 0, 0, 64, 64]

    pe, pooled = encoder.encode_text([""])
    assert set(cached.uncond) == {"prompt_embeds", "pooled_prompt_embeds"}
    torch.testing.assert_close(cached.uncond["prompt_embeds"], pe[0], rtol=0, atol=0)
    torch.testing.assert_close(cached.uncond["pooled_prompt_embeds"], pooled[0], rtol=0, atol=0)

    with pytest.raises(FileExistsError, match="overwrite"):
        encode_main([str(raw / "s-000000.tar"), str(out), "--model", str(tiny_sdxl_dir), "--no-progress"])
