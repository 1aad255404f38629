"""The train flow behind `python train.py`: build everything from the config, fit, return metrics.

cheap checks (every knob, the strategies, the module, the checkpoint) -> model lookup -> data ->
callbacks, loggers -> trainer -> fit -> metrics. Nothing heavy is touched before every knob is checked.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from tdd_lightning.checkpoint_io import CheckpointError, check_checkpoint, clean_checkpoint_folder
from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.models.loading import ModelNotFoundError, resolve_model_path
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


def prepare_model(model_cfg: DictConfig) -> None:
    """Fail fast on a model that cannot be found; build the tiny pipeline if asked to."""
    path = Path(str(model_cfg.pretrained))
    if model_cfg.get("build_if_missing") and not (path / "unet").is_dir():
        if not model_cfg.get("builder"):
            raise UserError(
                "model.build_if_missing=true needs model.builder (a function that writes the folder)"
            )
        from tdd_lightning.training.distributed import import_class

        log.info("building %s into %s", model_cfg.builder, path)
        import_class(model_cfg.builder)(path)
    try:
        resolve_model_path(str(model_cfg.pretrained), model_cfg.get("revision"))
    except ModelNotFoundError as e:
        raise UserError(f"model.pretrained: {e}") from None


def build_module(cfg: DictConfig, strategies: dict[str, Any] | None = None) -> TDDModule:
    """The LightningModule with its strategies; cheap (the UNet is loaded later, in configure_model)."""
    strategies = strategies or build_strategies(cfg)
    module_cfg = cfg.get("module") or {}
    try:
        return TDDModule(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            **strategies,
            optimizer=build("optimizer", cfg.optimizer),
            lr_scheduler=build("lr_scheduler", cfg.get("lr_scheduler")),
            ema_decay=module_cfg.get("ema_decay", 0.0),
            seed=int(cfg.seed),
            max_nonfinite_steps=module_cfg.get("max_nonfinite_steps", 10),
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


def check_config(cfg: DictConfig) -> TDDModule:
    """Everything that can be checked before loading anything heavy; returns the module, not yet loaded.

    Every knob's range and type, the strategies and the module built (they check their own knobs), and a
    resume checkpoint readable: all before the model is located, so a bad value never waits on a download.
    """
    module = build_module(cfg, check_cheap(cfg))
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        try:
            check_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise UserError(f"ckpt_path: {e}") from None
    elif is_rank_zero():
        refuse_fresh_run_over_checkpoints(cfg.paths.output_dir)
    return module


def train(cfg: DictConfig) -> dict[str, float]:
    # cheap checks first: every knob's range and type, the strategies built, the checkpoint readable
    module = check_config(cfg)
    owner = RunFolderLock(cfg.paths.output_dir) if is_rank_zero() else nullcontext()
    with owner:  # one run per folder (rank 0 holds the lock for the job)
        return fit(cfg, module)


def fit(cfg: DictConfig, module: TDDModule) -> dict[str, float]:
    """Locate the model, build data, callbacks, loggers and the trainer; fit; write metrics.json."""
    L.seed_everything(cfg.seed, workers=True)
    # only then the model (located, or built when asked for) and the data
    prepare_model(cfg.model)
    datamodule = build("data", cfg.data)
    callbacks = [build(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items() if v]
    loggers = [build(f"logger.{k}", v) for k, v in (cfg.get("logger") or {}).items() if v]
    trainer: L.Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
    clean_checkpoint_folder(trainer)  # the temp files of a save killed mid-write (kill -9)
    resolved = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}  # fmt: skip
    for logger in loggers:
        logger.log_hyperparams(resolved)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
