"""Train a few-step LoRA by Target-Driven Distillation: `python train.py experiment=toy_tdd`.

All options are Hydra configs under conf/ (see conf/train.yaml); `--help` lists the groups.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tdd_lightning.training import resolvers

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("TDD_ROOT", str(ROOT))
resolvers.register()
log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from tdd_lightning.errors import exit_on_user_error
    from tdd_lightning.training.building import check_cheap

    exit_on_user_error(lambda: check_cheap(cfg))  # seconds: before Lightning, diffusers or the model
    from tdd_lightning.training.run import train

    log.info("output folder: %s", HydraConfig.get().runtime.output_dir)
    metrics = exit_on_user_error(lambda: train(cfg))
    log.info("output folder: %s", HydraConfig.get().runtime.output_dir)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error
    from tdd_lightning.training.overrides import precheck

    # an unknown key is answered with the valid keys and a did-you-mean, before Hydra's own advice
    exit_on_user_error(lambda: precheck(sys.argv[1:], str(ROOT / "conf"), "train"))
    main()
