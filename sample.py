"""Sample with an exported TDD LoRA: `python sample.py lora=<exported LoRA file or folder>`.

A stock diffusers SDXL pipeline + the LoRA + TDDScheduler (conf/sample.yaml lists every option); the flow
lives in ``tdd_lightning.sample``. Writes one PNG per image to <output>/images/ and a labelled grid (rows:
prompts, columns: settings) to <output>/grid.png. Lists of steps, eta or guidance_scale make the columns.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tdd_lightning.training import resolvers

os.environ.setdefault("TDD_ROOT", str(Path(__file__).resolve().parent))
resolvers.register()  # conf/sample.yaml names its run folder with safe_dirname


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from tdd_lightning.errors import exit_on_user_error
    from tdd_lightning.sample import run

    exit_on_user_error(lambda: run(cfg))


if __name__ == "__main__":
    main()
