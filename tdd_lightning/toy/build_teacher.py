"""Build the toy teacher pipeline: train the autoencoder, then the UNet, and save a diffusers folder.

    python -m tdd_lightning.toy.build_teacher --data data/shapes/two --out models/toy-teacher --seed 0

Stages (CPU, 2 threads): 1. the VAE as an autoencoder on the train images; 2. encode all train
images (latent modes x scaling factor) and the unique captions (tiny frozen random CLIP encoders,
word-level tokenizer); 3. the UNet as an eps-prediction model with caption dropout to zeros. The
folder (fp16 safetensors) loads with ``tdd_lightning.models.load_sdxl_components``; ``build_info.json``
records the command, configs, timings and losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tdd_lightning.data.shapes import SHAPES_VOCAB
from tdd_lightning.toy.data import load_split
from tdd_lightning.toy.teacher import TeacherConfig, train_teacher
from tdd_lightning.toy.vae import VAEConfig, build_vae, encode_modes, psnr, train_vae

IMAGE_SIZE = 32


def build_text(seed: int):
    """Word-level tokenizer and two frozen random CLIP text encoders (TinySDXLConfig defaults)."""
    from tdd_lightning.models.tiny import TinySDXLConfig, text_encoder_from_config
    from tdd_lightning.models.tokenizer import EOS, make_clip_tokenizer

    cfg = TinySDXLConfig(words=SHAPES_VOCAB, seed=seed)
    tokenizer = make_clip_tokenizer(cfg.words)
    eos_id, vocab = tokenizer.convert_tokens_to_ids(EOS), len(tokenizer)
    torch.manual_seed(seed)
    te1 = text_encoder_from_config(cfg, cfg.text_hidden_size[0], vocab, eos_id, projection=False)
    te2 = text_encoder_from_config(cfg, cfg.text_hidden_size[1], vocab, eos_id, projection=True)
    return tokenizer, te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)


def build_unet(cfg: TeacherConfig, seed: int):
    from tdd_lightning.models.tiny import TinySDXLConfig, unet_from_config

    torch.manual_seed(seed)
    n = len(cfg.block_out_channels)
    tiny = TinySDXLConfig(
        sample_size=IMAGE_SIZE // 4,
        block_out_channels=cfg.block_out_channels,
        attention_head_dim=cfg.attention_head_dim,
        transformer_layers_per_block=(1,) * n,
    )
    return unet_from_config(tiny)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    vd, td = VAEConfig(), TeacherConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes/two", help="shapes folder (make shapes)")
    p.add_argument("--out", default="models/toy-teacher", help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=vd.steps)
    p.add_argument("--vae-batch", type=int, default=vd.batch_size)
    p.add_argument("--vae-channels", type=int, nargs="+", default=list(vd.block_out_channels))
    p.add_argument("--unet-steps", type=int, default=td.steps)
    p.add_argument("--unet-batch", type=int, default=td.batch_size)
    p.add_argument("--unet-lr", type=float, default=td.lr)
    p.add_argument("--vae", help="reuse this trained VAE folder (diffusers AutoencoderKL) instead of stage 1")
    p.add_argument("--init-unet", help="continue training the UNet of this pipeline folder (a later stage)")
    p.add_argument("--only-vae", action="store_true", help="stop after stage 1 (artifacts/<out name>-vae)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no training progress bars (stderr)")
    return p.parse_args(argv)


def stage_vae(a: argparse.Namespace, pixels: torch.Tensor, heldout: torch.Tensor) -> tuple:
    """1. The autoencoder: trained on the train images (or reused with ``--vae``), its scaling factor set
    to 1 / std of the latent modes. Returns (vae, latent modes, info)."""
    vcfg = VAEConfig(
        steps=a.vae_steps, batch_size=a.vae_batch, block_out_channels=tuple(a.vae_channels), seed=a.seed
    )
    t0 = time.time()
    if a.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(a.vae, torch_dtype=torch.float32).eval()
        stage1 = Path(a.vae) / "build_info.json"
        vstats = json.loads(stage1.read_text())["vae"] if stage1.exists() else {}
        vstats |= {"reused": a.vae}
    else:
        torch.manual_seed(a.seed)
        vae = build_vae(vcfg)
        vstats = train_vae(vae, pixels, vcfg, progress=not a.no_progress)
        vae.save_pretrained(vae_folder(a.out))  # stage 1, reusable with --vae
    modes = encode_modes(vae, pixels)
    scaling = 1.0 / modes.std().item()
    vae.register_to_config(scaling_factor=scaling)
    info = (
        ({} if a.vae else asdict(vcfg))
        | vstats
        | {
            "seconds": vstats.get("seconds", round(time.time() - t0)),
            "psnr_heldout": round(psnr(vae, heldout), 2),
            "scaling_factor": scaling,
            "params": sum(q.numel() for q in vae.parameters()),
        }
    )
    return vae, modes, info


def vae_folder(out: str | Path) -> Path:
    """Where stage 1 saves the trained VAE: ``artifacts/<out name>-vae``."""
    return Path("artifacts") / f"{Path(out).name}-vae"


@dataclass
class EncodedCaptions:
    """2. The text side: the tokenizer and text encoders, the unique captions' embeddings, and for each
    train image the index of its caption."""

    tokenizer: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    captions: list[str]
    caption_index: torch.Tensor  # [N] index into captions
    text: dict[str, torch.Tensor]  # the SDXL text parts of each caption: [len(captions), ...]


def stage_encode(a: argparse.Namespace, vae, attributes: list[dict]) -> EncodedCaptions:
    """2. Encode the unique captions (the text encoders of ``--init-unet``, else fresh seeded ones)."""
    from tdd_lightning.models.families.sdxl import SDXLEncoder

    if a.init_unet:  # keep the text encoders the UNet was trained with
        from tdd_lightning.models import load_sdxl_components

        c = load_sdxl_components(a.init_unet, load_vae=False)
        tokenizer, te1, te2 = c.tokenizer, c.text_encoder, c.text_encoder_2
    else:
        tokenizer, te1, te2 = build_text(a.seed)
    encoder = SDXLEncoder(vae, te1, te2, tokenizer, tokenizer)
    captions = sorted({x["caption"] for x in attributes})
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[x["caption"]] for x in attributes])
    chunks = [encoder.encode_captions(captions[i : i + 512]) for i in range(0, len(captions), 512)]
    text = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    return EncodedCaptions(tokenizer, te1, te2, captions, caption_index, text)


def stage_unet(a: argparse.Namespace, latents: torch.Tensor, text: EncodedCaptions, info: dict):
    """3. The UNet (fresh and seeded, or ``--init-unet``'s) trained as an eps-prediction model on the scaled
    latents; records ``init_unet`` and ``unet`` in ``info``. Returns its EMA copy."""
    from tdd_lightning.diffusion import NoiseSchedule
    from tdd_lightning.models.families.sdxl import SDXL
    from tdd_lightning.models.tiny import SDXL_SCHEDULER

    tcfg = TeacherConfig(steps=a.unet_steps, batch_size=a.unet_batch, lr=a.unet_lr, seed=a.seed)
    unet = build_unet(tcfg, a.seed)
    if a.init_unet:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(a.init_unet, subfolder="unet", torch_dtype=torch.float32)
        info["init_unet"] = json.loads((Path(a.init_unet) / "build_info.json").read_text())
    schedule = NoiseSchedule.from_config(SDXL_SCHEDULER)
    t0 = time.time()
    ema, loss = train_teacher(
        unet, latents, text.caption_index, text.text, SDXL.square_geometry(IMAGE_SIZE, 1),
        schedule, tcfg, progress=not a.no_progress,
    )  # fmt: skip
    info["unet"] = asdict(tcfg) | {
        "seconds": round(time.time() - t0),
        "final_loss_avg": loss,
        "params": sum(q.numel() for q in ema.parameters()),
        "unique_captions": len(text.captions),
    }
    return ema


def save_pipeline(out: Path, vae, text: EncodedCaptions, unet) -> None:
    """The diffusers folder: the parts as a stock SDXL pipeline (Euler scheduler), in fp16."""
    from diffusers import EulerDiscreteScheduler

    from tdd_lightning.models.families.sdxl import SDXLComponents
    from tdd_lightning.models.tiny import SDXL_SCHEDULER

    parts = SDXLComponents(
        unet, vae, text.text_encoder, text.text_encoder_2, text.tokenizer, text.tokenizer,
        EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )  # fmt: skip
    pipe = parts.to_pipeline()
    pipe.to(torch.float16)
    pipe.save_pretrained(out)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    info: dict = {
        "command": "python -m tdd_lightning.toy.build_teacher "
        + " ".join(sys.argv[1:] if argv is None else argv)
    }

    start = time.time()
    pixels, attributes = load_split(a.data, "train")
    heldout, _ = load_split(a.data, "heldout", limit=500)
    print(f"loaded {len(pixels)} train images ({time.time() - start:.0f} s)", flush=True)

    vae, modes, info["vae"] = stage_vae(a, pixels, heldout)
    print(f"vae: {info['vae']}", flush=True)
    if a.only_vae:
        (vae_folder(out) / "build_info.json").write_text(json.dumps(info, indent=1))
        return info

    text = stage_encode(a, vae, attributes)
    ema = stage_unet(a, modes * vae.config.scaling_factor, text, info)
    print(f"unet: {info['unet']}", flush=True)

    save_pipeline(out, vae, text, ema)
    info["total_seconds"] = round(time.time() - start)
    info["size_mib"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 2)
    (out / "build_info.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"wrote {out} ({info['size_mib']} MiB, {info['total_seconds']} s)", flush=True)
    return info


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
