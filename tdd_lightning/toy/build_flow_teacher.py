"""Build the toy flow teacher: a tiny FLUX pipeline trained on the shapes task, saved as a FluxPipeline.

    python -m tdd_lightning.toy.build_flow_teacher --data data/shapes/two --out models/toy-flow-teacher

Stages (CPU, 2 threads): 1. encode the train images with the UNet toy teacher's trained VAE
(``--vae``; 4 latent channels, 32x32 px -> 8x8), set its ``shift_factor`` to the latents' mean and
``scaling_factor`` to 1 / std of the shifted latents (FLUX's normalisation, (z - shift) * scale); 2. build
the tiny FLUX parts (``tdd_lightning.models.flux_tiny``; frozen random CLIP and T5 encoders, word-level
tokenizers) and encode "" and the unique captions as FluxPipeline does; 3. train the transformer with
the rectified-flow loss (:mod:`tdd_lightning.toy.flow_teacher`), caption dropout to "". The folder
(fp16 safetensors) loads with ``diffusers.FluxPipeline.from_pretrained``; ``build_info.json`` records the
command, configs, timings and losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tdd_lightning.data.shapes import SHAPES_VOCAB
from tdd_lightning.toy.data import load_split
from tdd_lightning.toy.flow_sampling import encode_flow_prompts, pack
from tdd_lightning.toy.flow_teacher import FlowTeacherConfig, train_flow_teacher
from tdd_lightning.toy.vae import encode_modes

IMAGE_SIZE = 32


def flux_config(a: argparse.Namespace):
    """The transformer's sizes: ``--heads`` heads of ``--head-dim``, RoPE axes (text, row, column)
    splitting the head dimension 1 : 2 : 2 (rounded to even sizes)."""
    from tdd_lightning.models.flux_tiny import TinyFluxConfig, flux_scheduler_config

    side = (2 * a.head_dim // 5) // 2 * 2
    axes = (a.head_dim - 2 * side, side, side)
    return TinyFluxConfig(
        num_layers=a.layers,
        num_single_layers=a.single_layers,
        attention_head_dim=a.head_dim,
        num_attention_heads=a.heads,
        axes_dims_rope=axes,
        text_length=12,  # the longest caption is 11 T5 tokens (10 words and </s>)
        scheduler=flux_scheduler_config(base_seq_len=(IMAGE_SIZE // 8) ** 2),
        words=SHAPES_VOCAB,
        seed=a.seed,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    td = FlowTeacherConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes/two", help="shapes folder (make shapes)")
    p.add_argument("--out", default="models/toy-flow-teacher", help="FluxPipeline folder to write")
    p.add_argument("--vae", default="models/toy-teacher", help="pipeline folder whose vae/ is reused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=td.steps)
    p.add_argument("--batch", type=int, default=td.batch_size)
    p.add_argument("--lr", type=float, default=td.lr)
    p.add_argument("--warmup", type=int, default=td.warmup)
    p.add_argument(
        "--init", help="continue training this flow teacher folder (its transformer, text encoders, VAE)"
    )
    p.add_argument("--limit", type=int, help="use only the first LIMIT train images (tests)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100, help="print the loss every so many steps (0: never)")
    p.add_argument("--no-progress", action="store_true", help="no training progress bar (stderr)")
    return p.parse_args(argv)


def stage_latents(a: argparse.Namespace, pixels: torch.Tensor) -> tuple:
    """1. The reused VAE, shift and scale set from the train latents. Returns (vae, packed latents, info)."""
    from diffusers import AutoencoderKL

    t0 = time.time()
    source = a.init or a.vae
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32).eval()
    modes = encode_modes(vae, pixels)
    if a.init:  # a later stage keeps the normalisation the transformer was trained with
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    else:
        shift = modes.mean().item()
        scale = 1.0 / (modes - shift).std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    info = {
        "reused": source,
        "shift_factor": shift,
        "scaling_factor": scale,
        "seconds": round(time.time() - t0),
    }
    return vae, pack((modes - shift) * scale), info


def main(argv: list[str] | None = None) -> dict:
    from tdd_lightning.models.flux_tiny import build_tiny_flux_parts

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    args = sys.argv[1:] if argv is None else argv
    info: dict = {"command": "python -m tdd_lightning.toy.build_flow_teacher " + " ".join(args)}

    start = time.time()
    pixels, attributes = load_split(a.data, "train", limit=a.limit)
    print(f"loaded {len(pixels)} train images ({time.time() - start:.0f} s)", flush=True)
    vae, latents, info["vae"] = stage_latents(a, pixels)
    print(f"vae: {info['vae']}", flush=True)

    # 2. the parts (seeded, or --init's) and the text condition of "" (row 0) and every unique caption
    if a.init:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(a.init, torch_dtype=torch.float32)
        pipe.register_modules(vae=vae)
        info["init"] = json.loads((Path(a.init) / "build_info.json").read_text())
        info["flux"] = info["init"]["flux"]
    else:
        cfg = flux_config(a)
        pipe = build_tiny_flux_parts(cfg, vae=vae).to_pipeline()
        info["flux"] = {k: v for k, v in asdict(cfg).items() if k != "words"}
    captions = [""] + sorted({x["caption"] for x in attributes})
    lookup = {c: i for i, c in enumerate(captions)}
    caption_index = torch.tensor([lookup[x["caption"]] for x in attributes])
    text = encode_flow_prompts(pipe, captions, IMAGE_SIZE // 4)

    # 3. the transformer
    tcfg = FlowTeacherConfig(
        steps=a.steps, batch_size=a.batch, lr=a.lr, warmup=a.warmup, seed=a.seed,
        mu=float(pipe.scheduler.config.base_shift),  # the scheduler's mu at 16 tokens
    )  # fmt: skip
    t0 = time.time()
    ema, loss = train_flow_teacher(
        pipe.transformer.float().requires_grad_(True), latents, caption_index, text, 0, tcfg,
        progress=not a.no_progress, log_every=a.log_every,
    )  # fmt: skip
    info["transformer"] = asdict(tcfg) | {
        "seconds": round(time.time() - t0),
        "final_loss_avg": loss,
        "params": sum(q.numel() for q in ema.parameters()),
        "unique_captions": len(captions) - 1,
        "train_images": len(pixels),
        "sigma": "logit-normal(0, 1), time-shifted with mu",
        "uncond": 'the encoded empty prompt ""',
    }
    print(f"transformer: {info['transformer']}", flush=True)

    pipe.register_modules(transformer=ema)
    pipe.to(torch.float16)
    pipe.save_pretrained(out)
    info["total_seconds"] = round(time.time() - start)
    info["size_mib"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 2)
    (out / "build_info.json").write_text(json.dumps(info, indent=1, default=str))
    print(f"wrote {out} ({info['size_mib']} MiB, {info['total_seconds']} s)", flush=True)
    return info


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
