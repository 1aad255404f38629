"""The train flow behind `python train.py`: build everything from the config, fit, return metrics.

seed -> model check -> data -> strategies -> module -> callbacks, loggers -> trainer -> fit -> metrics.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tdd_lightning.checkpoint_io import CheckpointError, check_checkpoint
from tdd_lightning.models.config import ModelConfig
from tdd_lightning.models.loading import ModelNotFoundError, resolve_model_path
from tdd_lightning.module import NonFiniteError, TDDModule
from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.training.validation import validate

log = logging.getLogger(__name__)
# The base UNet stays in eval mode on purpose (no dropout in SDXL; teacher and target must be eval)
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def build(group: str, node: DictConfig | None, **kwargs) -> Any:
    """Instantiate one config group; a bad value comes back as a message naming ``group.key``."""
    if node is None:
        return None
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise UserError(str(cause.with_prefix(group))) from None
        if isinstance(cause, (ValueError, FileNotFoundError, TypeError)):
            raise UserError(f"{group}: {cause}") from None
        raise


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


def build_module(cfg: DictConfig) -> TDDModule:
    """``cfg.module`` (its ``_target_``, TDDModule) over the model config and the built strategies.

    The optimizer and lr scheduler are partials the module calls with the student's LoRA parameters.
    """
    model = ModelConfig.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))
    make_module = build("module", cfg.module, _partial_=True)
    return make_module(
        model=model,
        target_selection=build("target_selection", cfg.target_selection),
        guidance=build("guidance", cfg.guidance),
        loss=build("loss", cfg.loss),
        optimizer=build("optimizer", cfg.optimizer),
        lr_scheduler=build("lr_scheduler", cfg.get("lr_scheduler")),
    )


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=auto``: resume from this run folder's checkpoints/last.ckpt if it exists, else start."""
    path = cfg.get("ckpt_path")
    if path != "auto":
        return path
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked before loading anything heavy."""
    try:
        validate(cfg)
        if resolve_ckpt_path(cfg):
            check_checkpoint(resolve_ckpt_path(cfg))
    except CheckpointError as e:
        raise UserError(f"ckpt_path: {e}") from None


def train(cfg: DictConfig) -> dict[str, float]:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    prepare_model(cfg.model)
    datamodule = build("data", cfg.data)
    module = build_module(cfg)
    callbacks = [build(f"callbacks.{k}", v) for k, v in (cfg.get("callbacks") or {}).items() if v]
    loggers = [build(f"logger.{k}", v) for k, v in (cfg.get("logger") or {}).items() if v]
    trainer: L.Trainer = build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
    resolved = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}  # fmt: skip
    for logger in loggers:
        logger.log_hyperparams(resolved)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    except NonFiniteError as e:
        raise UserError(str(e)) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
