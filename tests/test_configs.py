"""Every option of every config group composes and instantiates; every experiment smoke-runs."""

import os

import pytest
from hydra.utils import instantiate

from tdd_lightning.errors import UserError
from tdd_lightning.training.run import build, build_module, train
from tests.hydra_utils import compose_cfg, group_options


@pytest.fixture()
def tiny_overrides(tiny_sdxl_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    return [f"model.pretrained={tiny_sdxl_dir}", "model.build_if_missing=false"]


@pytest.mark.parametrize("group", ["target_selection", "guidance", "loss"])
def test_every_strategy_option_instantiates(group, tmp_path):
    for option in group_options(group):
        cfg = compose_cfg([f"{group}={option}"], tmp_path)
        obj = build(group, cfg[group])
        assert obj is not None, option


@pytest.mark.parametrize(
    "group", ["trainer", "logger", "callbacks", "model", "data", "debug", "hparams_search"]
)
def test_every_option_composes(group, tmp_path, tiny_overrides):
    for option in group_options(group):
        cfg = compose_cfg([f"{group}={option}", *tiny_overrides], tmp_path)
        if group == "trainer" and option in ("cpu", "default"):
            assert instantiate(cfg.trainer, logger=False).max_steps == cfg.trainer.max_steps
        if group == "logger":
            [instantiate(v) for v in cfg.logger.values()]
        if group == "callbacks":
            [instantiate(v) for v in cfg.callbacks.values()]


def test_gpu_strategies_instantiate(tmp_path, tiny_overrides):
    for option in ("ddp", "fsdp"):
        cfg = compose_cfg([f"trainer={option}", *tiny_overrides], tmp_path)
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ in ("DDPStrategy", "FSDPStrategy")


@pytest.mark.parametrize(
    "override, key",
    [
        ("target_selection.s_ratio=1.2", "target_selection.s_ratio"),
        ("guidance.p_empty=-0.1", "guidance.p_empty"),
        ("target_selection.k_min=9", "target_selection.k_min"),
    ],
)
def test_bad_values_fail_at_startup_naming_the_key(override, key, tmp_path, tiny_overrides):
    cfg = compose_cfg([override, *tiny_overrides], tmp_path)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_module(cfg)


def test_unknown_option_names_the_group(tmp_path):
    with pytest.raises(Exception, match="target_selection"):
        compose_cfg(["target_selection=bogus"], tmp_path)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_smoke_runs(experiment, tmp_path, tiny_overrides):
    overrides = [
        f"experiment={experiment}", *tiny_overrides, "model.base_dtype=fp32",
        "model.gradient_checkpointing=false",
        "data=synthetic", "data.batch_size=2", "data.num_samples=8", "trainer=cpu", "trainer.max_steps=2",
        "trainer.accumulate_grad_batches=1", "logger=csv", "callbacks.sample_grid.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]  # fmt: skip
    if experiment == "toy_tdd":  # its end-of-run evaluation needs the real teacher: see test_toy_eval.py
        overrides.append("~callbacks.toy_eval")
    cfg = compose_cfg(overrides, tmp_path / "out")
    metrics = train(cfg)
    assert metrics["global_step"] == 2 and metrics["train/loss"] > 0
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "out" / "samples").glob("*.png"))
