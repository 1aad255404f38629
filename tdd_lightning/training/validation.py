"""Start-up checks of the knobs that no class of ours owns: one message naming the key and its range.

The strategies and the module validate their own knobs when built (K range, N | T, s_ratio, p_empty, w
range, loss, EMA decay); this covers the rest of the config before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from tdd_lightning.errors import ConfigError, is_int, is_number

# key -> (test, allowed values in words), for the knobs of objects the project does not construct itself
# (Lightning's Trainer, torch's optimizer) and of the data; every class of ours checks its own knobs when
# built (strategies, TDDModule, ModelConfig, the callbacks), and train() builds those before the model is
# touched.
# A missing key is not checked.
RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "seed": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "optimizer.lr": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "optimizer.weight_decay": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "data.batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "data.num_samples": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "data.resolution": (
        lambda v: all(is_int(x) and x >= 8 and x % 8 == 0 for x in (v if OmegaConf.is_list(v) else [v])),
        "a multiple of 8 (the VAE's scale factor), or [height, width] of such",
    ),
    "data.samples_per_epoch": (lambda v: v is None or (is_int(v) and v >= 1), "null or an integer >= 1"),
    "trainer.max_steps": (lambda v: is_int(v) and (v == -1 or v >= 1), "-1 (no limit) or an integer >= 1"),
    "trainer.accumulate_grad_batches": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or (is_number(v) and v >= 0), "null or a number >= 0"),
    "trainer.log_every_n_steps": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
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
