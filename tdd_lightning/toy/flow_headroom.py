"""Score the toy flow teacher's K-step Euler samples with the shipped evaluator (its headroom).

    python -m tdd_lightning.toy.flow_headroom --teacher models/toy-flow-teacher --steps 50 8 4 2 1 \\
        --guidance 1 2 3 --n 1000 --seed 0 --out docs/results/toy_flow.json

The same prompts, real references and metrics as the UNet teacher's suite (:mod:`tdd_lightning.toy.suite`):
the first ``n`` held-out captions, FD against the next ``n`` held-out real images, the initial noise
``initial_noise(n, seed)`` (packed into FLUX tokens), prompt accuracy over all 7 canonical attributes;
"agree" is the mean evaluator-feature distance to the 50-step image of the same prompt, noise and CFG.
Sampler: :func:`tdd_lightning.toy.flow_sampling.sample_flow_images` (FluxPipeline's Euler schedule,
true CFG against "").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tdd_lightning.toy.data import HEADS, labels_tensor, load_split
from tdd_lightning.toy.flow_sampling import encode_flow_prompts, pack, sample_flow_images, scheduler_mu
from tdd_lightning.toy.metrics import agreement, classify, score
from tdd_lightning.toy.sampling import initial_noise

SIDE = 8  # latent side of a 32x32 image


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="models/toy-flow-teacher", help="FluxPipeline folder")
    p.add_argument("--evaluator", default="models/toy-evaluator")
    p.add_argument("--data", default="data/shapes/two")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 8, 4, 2, 1])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--ref-steps", type=int, default=50, help="the agreement reference (same CFG)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the records (JSON) here; the table is printed")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    from diffusers import FluxPipeline

    from tdd_lightning.toy.classifier import load_evaluator
    from tdd_lightning.toy.report import aggregate, markdown_table

    a = parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = FluxPipeline.from_pretrained(a.teacher, torch_dtype=torch.float32)
    evaluator = load_evaluator(a.evaluator)
    pixels, attrs = load_split(a.data, "heldout")
    prompts, labels = attrs[: a.n], labels_tensor(attrs[: a.n])
    _, real_feats = classify(evaluator, pixels[a.n : 2 * a.n])
    text = encode_flow_prompts(pipe, [""] + [x["caption"] for x in prompts], SIDE)
    rows, x_T = torch.arange(1, a.n + 1), pack(initial_noise(a.n, a.seed))
    mu = scheduler_mu(pipe.scheduler.config, x_T.shape[1])
    base = {"eta": 0.0, "seed": a.seed}

    preds, feats = classify(evaluator, pixels[: a.n])
    records = [
        {"model": "real images", "steps": "-", "guidance": 0.0}
        | base
        | score(preds, feats, labels, real_feats)
    ]
    steps = [a.ref_steps] + [k for k in a.steps if k != a.ref_steps]
    for g in a.guidance:
        ref = None
        for k in steps:
            t0 = time.time()
            images = sample_flow_images(pipe.transformer, pipe.vae, text, rows, 0, x_T, k, g, mu, SIDE)
            preds, feats = classify(evaluator, images)
            ref = feats if k == a.ref_steps else ref
            res = score(preds, feats, labels, real_feats) | {"agree": agreement(feats, ref)}
            rec = {"model": "flow teacher Euler", "steps": k, "guidance": g} | base | res
            records.append(rec | {"seconds": round(time.time() - t0, 1)})
            print(f"steps {k} CFG {g:g}: prompt acc {res['prompt_acc']:.3f} FD {res['fd']:.1f} "
                  f"agree {res['agree']:.2f} ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
            if a.out:
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(json.dumps(records, indent=1))
    print(markdown_table(aggregate(records), extra=[f"acc_{h}" for h in HEADS]))
    return records


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
