"""Start-up checks of the knobs that no strategy owns: one message naming the key and its allowed range.

The strategies validate their own knobs when built (K range, N | T, s_ratio, p_empty, w range, loss);
this covers the rest of the config before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from tdd_lightning.errors import ConfigError
from tdd_lightning.models.dtypes import DTYPES




# key -> (test, allowed range in words); a missing key is not checked
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "module.ema_decay": (lambda v: 0.0 <= float(v) <= 1.0, "a number in [0, 1]"),
    "module.max_nonfinite_steps": (lambda v: int(v) >= 1, "an integer >= 1"),
    "model.lora.rank": (lambda v: int(v) >= 1, "an integer >= 1"),
    "model.lora.alpha": (lambda v: v is None or float(v) > 0, "null or a number > 0"),
    "model.base_dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "optimizer.lr": (lambda v: float(v) > 0, "a number > 0"),
    "optimizer.weight_decay": (lambda v: float(v) >= 0, "a number >= 0"),
    "data.batch_size": (lambda v: int(v) >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: int(v) >= 0, "an integer >= 0"),
    "data.num_samples": (lambda v: int(v) >= 1, "an integer >= 1"),
    "data.resolution": (
        lambda v: all(int(x) >= 8 and int(x) % 8 == 0 for x in (v if OmegaConf.is_list(v) else [v])),
        "a multiple of 8 (the VAE's scale factor), or [height, width] of such",
    ),
    "data.samples_per_epoch": (lambda v: v is None or int(v) >= 1, "null or an integer >= 1"),
    "trainer.max_steps": (lambda v: int(v) == -1 or int(v) >= 1, "-1 (no limit) or an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: int(v) >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or float(v) >= 0, "null or a number >= 0"),
    "trainer.log_every_n_steps": (lambda v: int(v) >= 1, "an integer >= 1"),
}


def _lookup(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default="__missing__", throw_on_missing=False)
    return value


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first knob outside its range (message: key=value and the range)."""
    for key, (ok, allowed) in RULES.items():
        value = _lookup(cfg, key)
        if value == "__missing__":
            continue
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(key, value, f"must be {allowed}")
