"""The train flow behind `python train.py`: build everything from the config, fit, return metrics.

cheap checks (every knob, the strategies, the module, the checkpoint) -> model lookup -> data ->
callbacks, loggers -> trainer -> fit -> metrics. Nothing heavy is touched before every knob is checked.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from tdd_lightning.checkpoint_io import (
    CheckpointError,
    atomic_write,
    check_checkpoint,
    clean_checkpoint_folder,
)
from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.models.config import ModelConfig
from tdd_lightning.models.families import get_family
from tdd_lightning.models.loading import ModelNotFoundError, is_hub_id, resolve_model_path
from tdd_lightning.module import TDDModule
from tdd_lightning.training.building import build, build_strategies, check_cheap
from tdd_lightning.training.run_folder import (
    RunFolderLock,
    is_rank_zero,
    newest_checkpoint,
    refuse_fresh_run_over_checkpoints,
)

log = logging.getLogger(__name__)
# The base UNet stays in eval mode on purpose (no dropout in SDXL; teacher and target must be eval)
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


BUILT_MARKER = ".built-by-tdd_lightning"  # written into folders the random-model builders filled


def prepare_model(model_cfg: DictConfig, owned: list[str | None] = ()) -> None:
    """Fail fast on a model that cannot be found; build a random model only where that is safe.

    ``build_if_missing`` (the tiny and arch model groups) writes a random model only into a folder the
    project owns (under one of ``owned``: the artifacts and log folders), an empty folder, or one it
    built before; never into a user's folder with other files (a partial SDXL copy) and never at a path
    spelled like a hub id (``org/name``), which would later shadow the real model.
    """
    path = Path(str(model_cfg.pretrained)).expanduser()
    denoiser = get_family(model_cfg.get("family")).denoiser_subfolder  # unet/ (transformer/ for FLUX)
    if model_cfg.get("build_if_missing") and not (path / denoiser).is_dir():
        check_can_build_into(model_cfg, path, owned, denoiser)
        from tdd_lightning.training.distributed import import_class

        log.info("building %s into %s", model_cfg.builder, path)
        import_class(model_cfg.builder)(path)
        (path / BUILT_MARKER).write_text(f"{model_cfg.builder}\n")
    try:
        resolve_model_path(
            str(model_cfg.pretrained), model_cfg.get("revision"), required=(denoiser, "scheduler")
        )
    except ModelNotFoundError as e:
        raise UserError(f"model.pretrained: {e}") from None


def check_can_build_into(
    model_cfg: DictConfig, path: Path, owned: list[str | None], denoiser: str = "unet"
) -> None:
    if not model_cfg.get("builder"):
        raise UserError("model.build_if_missing=true needs model.builder (a function that writes the folder)")
    where = f"model.pretrained={model_cfg.pretrained}"
    if is_hub_id(str(model_cfg.pretrained)):
        raise UserError(
            f"{where} is a hub id: random models are built only into local folders (an absolute path), "
            "so a hub id never becomes a folder that shadows the real model"
        )
    roots = [Path(str(r)).expanduser().resolve() for r in owned if r]
    inside = any(path.resolve().is_relative_to(r) for r in roots)
    if path.is_dir() and any(path.iterdir()) and not (path / BUILT_MARKER).exists():
        raise UserError(
            f"{where} holds files but no {denoiser}/: refusing to build a random model into it (it would "
            "overwrite them); give a complete diffusers folder, or model.build_if_missing=false"
        )
    if not path.exists() and not inside:
        raise UserError(
            f"{where} does not exist; a random model is built only under the project's folders "
            f"({', '.join(map(str, roots))}) or into an empty folder you created: check the path"
        )


def build_module(cfg: DictConfig, strategies: dict[str, Any] | None = None) -> TDDModule:
    """``cfg.module`` (its ``_target_``, TDDModule) over the model config and the built strategies.

    Cheap: the UNet is loaded later, in configure_model. The optimizer and lr scheduler are partials the
    module calls with the student's LoRA parameters.
    """
    model = ModelConfig.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))
    strategies = strategies or build_strategies(cfg)
    make_module = build("module", cfg.module, _partial_=True)
    try:
        return make_module(
            model=model,
            **strategies,
            optimizer=build("optimizer", cfg.optimizer),
            lr_scheduler=build("lr_scheduler", cfg.get("lr_scheduler")),
        )
    except ConfigError as e:
        raise e.with_prefix("module") from None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=auto``: resume from this run folder's newest checkpoint if it has one, else start."""
    path = cfg.get("ckpt_path")
    if path != "auto":
        return path
    newest = newest_checkpoint(cfg.paths.output_dir)
    return str(newest) if newest else None


@dataclass
class Prepared:
    """What the cheap checks built: the module (its UNet not yet loaded), the callbacks, and the checkpoint
    to resume (checked readable; None: a fresh start)."""

    module: TDDModule
    callbacks: list[L.Callback]
    ckpt_path: str | None


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every callback, built (so its settings checked) at start-up, not at its first use hours later."""
    return [build(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items() if v]


def check_config(cfg: DictConfig) -> Prepared:
    """Everything that can be checked before loading anything heavy; returns what it built.

    Every knob's range and type, the strategies, the module and the callbacks built (each checks its own
    settings), and a resume checkpoint readable: all before the model is located, so a bad value never
    waits on a download or crashes a run at its first sample grid.
    """
    module = build_module(cfg, check_cheap(cfg))
    callbacks = build_callbacks(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        try:
            check_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise UserError(f"ckpt_path: {e}") from None
    elif is_rank_zero():
        refuse_fresh_run_over_checkpoints(cfg.paths.output_dir)
    return Prepared(module, callbacks, ckpt_path)


def train(cfg: DictConfig) -> dict[str, float]:
    # cheap checks first: every knob's range and type, the strategies built, the checkpoint readable
    prepared = check_config(cfg)
    owner = RunFolderLock(cfg.paths.output_dir) if is_rank_zero() else nullcontext()
    with owner:  # one run per folder (rank 0 holds the lock for the job)
        return fit(cfg, prepared)


def fit(cfg: DictConfig, prepared: Prepared) -> dict[str, float]:
    """Locate the model, build data, loggers and the trainer; fit what ``prepared`` holds; metrics.json."""
    L.seed_everything(cfg.seed, workers=True)
    # only then the model (located, or built when asked for) and the data
    prepare_model(cfg.model, owned=[cfg.paths.get("artifacts_dir"), cfg.paths.get("log_dir")])
    datamodule = build("data", cfg.data)
    module, callbacks = prepared.module, prepared.callbacks
    loggers = [build(f"logger.{k}", v) for k, v in (cfg.get("logger") or {}).items() if v]
    trainer: L.Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
    clean_checkpoint_folder(trainer)  # the temp files of a save killed mid-write (kill -9)
    resolved = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}  # fmt: skip
    for logger in loggers:
        logger.log_hyperparams(resolved)

    trainer.fit(module, datamodule=datamodule, ckpt_path=prepared.ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    return metrics
