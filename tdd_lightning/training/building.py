"""Build config groups with one-line errors, and the checks cheap enough to run before anything heavy.

Light on purpose (omegaconf, hydra's instantiate and the strategies only; no Lightning, no diffusers):
train.py runs ``check_cheap`` before it imports the training stack, so a bad strategy value is answered
in seconds, before any model is looked up or downloaded.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.models.config import ModelConfig
from tdd_lightning.training.config_checks import check_node
from tdd_lightning.training.validation import validate

STRATEGY_GROUPS = ("target_selection", "guidance", "loss", "adversarial")


def build(group: str, node: DictConfig | None, **kwargs) -> Any:
    """Instantiate one config group; a bad key or value comes back as a message naming ``group.key``."""
    if node is None:
        return None
    check_node(group, node)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ConfigError):
            raise cause.with_prefix(group) from None
        if isinstance(cause, (ValueError, FileNotFoundError, TypeError)) or type(cause).__name__ == (
            "MisconfigurationException"  # Lightning's own check of its callbacks' and trainer's settings
        ):
            raise UserError(f"{group}: {cause}") from None
        raise


def build_strategies(cfg: DictConfig) -> dict[str, Any]:
    """Target selection, guidance, loss and adversarial term, built (so validated: each checks its own knobs).

    The adversarial term also checks the trainer settings it cannot train with (gradient accumulation)."""
    strategies = {group: build(group, cfg[group]) for group in STRATEGY_GROUPS}
    trainer = cfg.get("trainer") or {}
    strategies["adversarial"].check_trainer(
        trainer.get("accumulate_grad_batches", 1), str(trainer.get("precision", "32-true"))
    )
    return strategies


def check_cheap(cfg: DictConfig) -> dict[str, Any]:
    """Every knob's range and type, the model config and the strategies built; returns the strategies."""
    validate(cfg)
    ModelConfig.from_mapping(OmegaConf.to_container(cfg.model, resolve=True))
    return build_strategies(cfg)
