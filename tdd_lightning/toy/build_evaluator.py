"""Train and save the toy evaluator (attribute classifier of real shapes images).

python -m tdd_lightning.toy.build_evaluator --data data/shapes/two --out models/toy-evaluator --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tdd_lightning.toy.classifier import (
    AttributeClassifier,
    EvaluatorConfig,
    save_evaluator,
    train_classifier,
)
from tdd_lightning.toy.data import labels_tensor, load_split


def main(argv: list[str] | None = None) -> dict:
    from tdd_lightning.toy.metrics import classify

    d = EvaluatorConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes/two", help="shapes folder (make shapes)")
    p.add_argument("--out", default="models/toy-evaluator")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = EvaluatorConfig(epochs=a.epochs, seed=a.seed)
    start = time.time()
    pixels, attributes = load_split(a.data, "train")
    heldout, held_attrs = load_split(a.data, "heldout")
    torch.manual_seed(cfg.seed)
    model = AttributeClassifier(cfg.channels, cfg.features)
    loss = train_classifier(model, pixels, labels_tensor(attributes), cfg)
    preds, _ = classify(model, heldout)
    labels = labels_tensor(held_attrs)
    correct = preds == labels
    info = {
        "command": "python -m tdd_lightning.toy.build_evaluator "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.time() - start),
        "final_loss_avg": loss,
        "params": sum(q.numel() for q in model.parameters()),
        "heldout_prompt_accuracy": correct.all(1).float().mean().item(),
        "heldout_head_accuracy": correct.float().mean(0).tolist(),
    }
    save_evaluator(model, cfg, a.out, info)
    print(info, flush=True)
    return info


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
