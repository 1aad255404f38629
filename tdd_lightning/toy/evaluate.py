"""Evaluate the toy teacher: DDIM (trailing, eta 0) at several step counts and guidances vs 50 steps.

    python -m tdd_lightning.toy.evaluate --steps 1 2 4 8 50 --guidance 2 --n 1000 --seeds 0 1 \\
        --out outputs/toy-eval

Prompts are the first n held-out captions; FD compares against the other n held-out real images
(equal counts); agreement compares each k-step image with the 50-step image of the same prompt and
initial noise. Writes ``table.md``, ``results.json`` and ``grid.png`` (first 12 prompts, first seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tdd_lightning.toy.data import HEADS, labels_tensor, load_split, to_uint8, to_unit


def mean_std(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) == 1:
        return f"{t.item():.3g}"
    return f"{t.mean().item():.3g} ± {t.std().item():.2g}"


def main(argv: list[str] | None = None) -> dict:
    from diffusers.utils import logging as dlogging

    from tdd_lightning.diffusion import NoiseSchedule
    from tdd_lightning.models import load_sdxl_components
    from tdd_lightning.plotting import label_grid
    from tdd_lightning.toy.classifier import load_evaluator
    from tdd_lightning.toy.metrics import agreement, classify, score
    from tdd_lightning.toy.sampling import encode_prompts, initial_noise, sample_images, trailing_timesteps

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/toy-teacher")
    p.add_argument("--evaluator", default="models/toy-evaluator")
    p.add_argument("--data", default="data/shapes/two")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50])
    p.add_argument("--ref-steps", type=int, default=50, help="the teacher reference for agreement")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    p.add_argument("--n", type=int, default=1000, help="samples per cell (<= half the held-out split)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="outputs/toy-eval")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dlogging.set_verbosity_error()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    comp = load_sdxl_components(a.teacher)
    schedule = NoiseSchedule.from_config(comp.noise_scheduler.config)
    evaluator = load_evaluator(a.evaluator)
    pixels, attrs = load_split(a.data, "heldout")
    if 2 * a.n > len(pixels):
        raise ValueError(
            f"--n {a.n}: the held-out split has {len(pixels)} images, need 2n (prompts + reference)"
        )
    prompts = attrs[: a.n]
    labels = labels_tensor(prompts)
    _, real_feats = classify(evaluator, pixels[a.n : 2 * a.n])
    real_preds, real_own = classify(evaluator, pixels[: a.n])
    rows = {"real images": [score(real_preds, real_own, labels, real_feats) | {"agree": float("nan")}]}
    with torch.no_grad():  # the autoencoder's ceiling: real images encoded and decoded
        z = comp.vae.encode(to_unit(pixels[: a.n])).latent_dist.mode()
        recon = to_uint8(comp.vae.decode(z).sample)
    rec_preds, rec_feats = classify(evaluator, recon)
    rows["VAE reconstructions"] = [score(rec_preds, rec_feats, labels, real_feats) | {"agree": float("nan")}]
    cond = encode_prompts(comp, [x["caption"] for x in prompts])
    steps = sorted(set(a.steps) | {a.ref_steps}, reverse=True)
    grid_cols: dict[str, torch.Tensor] = {}
    for seed in a.seeds:
        x_T = initial_noise(a.n, seed)
        for g in a.guidance:
            ref_feats = None
            for k in steps:  # the reference (most steps) first
                t0 = time.time()
                images = sample_images(comp.unet, comp.vae, cond, x_T, trailing_timesteps(k), g, schedule)
                preds, feats = classify(evaluator, images)
                ref_feats = feats if k == a.ref_steps else ref_feats
                res = score(preds, feats, labels, real_feats) | {"agree": agreement(feats, ref_feats)}
                rows.setdefault(f"DDIM trailing, {k} steps, CFG {g:g}", []).append(res)
                print(f"seed {seed} g {g:g} k {k}: {res} ({time.time() - t0:.0f} s)", flush=True)
                if seed == a.seeds[0] and g == a.guidance[0]:
                    grid_cols[f"{k} steps"] = images[:12]
    grid_cols["real"] = pixels[:12]
    titles = list(grid_cols)
    grid = label_grid(
        [c.float() / 255 for c in grid_cols.values()], titles, [x["caption"] for x in prompts[:12]], cell=96
    )
    grid.save(out / "grid.png")

    heads = list(HEADS)
    lines = [
        f"n = {a.n} per cell, seeds {a.seeds}, teacher {a.teacher}; agree = mean feature distance to the "
        f"{a.ref_steps}-step image (same noise)",
        "",
        "| sampler | prompt acc | FD | agree | " + " | ".join(heads) + " |",
        "|---" * (4 + len(heads)) + "|",
    ]
    for name, results in rows.items():
        cells = [mean_std([r[m] for r in results]) for m in ("prompt_acc", "fd", "agree")]
        cells += [mean_std([r[f"acc_{h}"] for r in results]) for h in heads]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(table)
    print(f"wrote {out} ({time.time() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
