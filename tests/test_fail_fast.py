"""Bad configs are answered first and in one line: strategy values before any model lookup, types named,
unknown keys with the valid keys and a did-you-mean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.strategies import DecoupledGuidance
from tdd_lightning.training.building import build, check_cheap
from tdd_lightning.training.config_checks import check_types, unknown_key_message
from tdd_lightning.training.overrides import first_of_sweeps, overrides_from_argv, precheck
from tests.hydra_utils import CONF, compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip


def test_sdxl_strategy_value_is_reported_before_the_model(tmp_path):
    """Offline and without SDXL weights, s_ratio is what the user hears about (not the missing model)."""
    r = run_train("experiment=sdxl_tdd", "target_selection.s_ratio=2", tmp_path=tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: target_selection.s_ratio=2 is invalid: must lie in [0, 1)"], r.stderr
    assert "Traceback" not in r.stderr and "pretrained" not in r.stderr


def test_unknown_key_suggests_the_close_one(tmp_path):
    r = run_train("target_selection.sratio=0.2", tmp_path=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: target_selection.sratio: no such key (did you mean s_ratio?); valid keys of "
        "target_selection: num_teacher_steps, k_min, k_max, window, s_ratio, num_train_timesteps"
    ], r.stderr
    assert "+target_selection" not in r.stderr  # not Hydra's advice to append


@pytest.mark.parametrize(
    "override, message",
    [
        ("guidance.p_empty=abc", "guidance.p_empty='abc' is invalid: must be a number"),
        ("target_selection.k_min=4.5", "target_selection.k_min=4.5 is invalid: must be an integer"),
        ("guidance.uncond=3", "guidance.uncond=3 is invalid: must be a string"),
        ("data.batch_size=3.7", "data.batch_size=3.7 is invalid: must be an integer >= 1"),
        ("model.lora.rank=2.5", "model.lora.rank=2.5 is invalid: must be an integer >= 1"),
        ("optimizer.lr=abc", "optimizer.lr='abc' is invalid: must be a number > 0"),
    ],
)
def test_type_errors_name_the_key_and_the_type(override, message, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(UserError) as e:
        check_cheap(cfg)
    assert str(e.value) == message


def test_an_int_is_a_number_and_null_needs_an_optional():
    node = {"_target_": "tdd_lightning.strategies.DecoupledGuidance", "p_empty": 0, "w": None}
    check_types("guidance", node)  # w: float | None takes null; p_empty: float takes 0
    with pytest.raises(ConfigError, match=r"^guidance\.p_empty=None is invalid: must be a number$"):
        check_types("guidance", {**node, "p_empty": None})
    with pytest.raises(ConfigError, match=r"must be a number or null$"):
        check_types("guidance", {**node, "w": True})


def test_a_key_the_class_does_not_take_is_refused_with_the_valid_ones(tmp_path):
    cfg = compose_cfg(["+guidance.p_emptyy=0.1"], tmp_path)
    with pytest.raises(UserError) as e:
        build("guidance", cfg.guidance)
    assert str(e.value) == (
        "guidance.p_emptyy: no such key (did you mean p_empty?); valid keys of guidance: "
        "p_empty, w, w_min, w_max, uncond"
    )


def test_a_constructor_argument_missing_from_the_yaml_gets_the_plus_advice(tmp_path):
    cfg = compose_cfg([], tmp_path)
    message = unknown_key_message("target_selection.num_train_timesteps", cfg.target_selection)
    assert message == (
        "target_selection.num_train_timesteps: not set by this config; "
        "add it with +target_selection.num_train_timesteps=<value>"
    )


def test_long_key_lists_show_the_configured_keys_only(tmp_path):
    cfg = compose_cfg([], tmp_path)
    message = unknown_key_message("trainer.max_step", cfg.trainer)
    assert message.startswith(
        "trainer.max_step: no such key (did you mean max_steps?); valid keys of trainer: "
    )
    assert "model_registry" not in message and "more arguments of lightning.pytorch.Trainer" in message


def test_precheck_reads_sweeps_and_skips_flags():
    assert overrides_from_argv(["-m", "--cfg", "job", "a=1", "~b", "c"]) == ["a=1", "~b"]
    assert overrides_from_argv(["--config-name", "sample", "a=1"]) is None
    assert first_of_sweeps(["x.y=1,2", "z=range(3,5)", "hydra.sweep.dir=/tmp/x", "+w=3"]) == [
        "x.y=1", "z=3", "+w=3",
    ]  # fmt: skip
    precheck(["-m", "target_selection.s_ratio=0.0,0.3"], str(CONF), "train")  # valid: no error
    with pytest.raises(UserError, match=r"guidance\.p_emty: no such key \(did you mean p_empty\?\)"):
        precheck(["-m", "guidance.p_emty=0.0,0.2"], str(CONF), "train")


def test_strategies_check_their_own_ranges():
    with pytest.raises(ConfigError, match=r"^p_empty=1\.5 is invalid"):
        DecoupledGuidance(p_empty=1.5)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "callbacks.sample_grid.every_n_steps=0",
            "callbacks.sample_grid.every_n_steps=0 is invalid: must be an",
        ),
        (
            "callbacks.sample_grid.steps=[4,0]",
            "callbacks.sample_grid.steps=[4, 0] is invalid: must be a non-empty",
        ),
        (
            "callbacks.sample_grid.eta=1.5",
            "callbacks.sample_grid.eta=1.5 is invalid: must be a finite number in",
        ),
        ("callbacks.time_histograms.every_n_steps=0", "callbacks.time_histograms.every_n_steps=0 is invalid"),
        (
            "callbacks.lora_export.formats=onnx",
            "callbacks.lora_export.formats='onnx' is invalid: choose from",
        ),
        (
            "callbacks.model_checkpoint.every_n_train_steps=-1",
            "callbacks.model_checkpoint: Invalid value for",
        ),
    ],
)
def test_callback_settings_are_checked_at_startup(override, message, tmp_path):
    """Issue 14, item 6: a bad grid setting fails before training, not at the first grid hours later."""
    from tdd_lightning.training.run import check_config

    with pytest.raises(UserError) as e:
        check_config(compose_cfg([override], tmp_path))
    assert str(e.value).startswith(message), str(e.value)
