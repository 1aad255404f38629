"""Every option of every config group composes and instantiates; every experiment smoke-runs."""

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tdd_lightning.errors import UserError
from tdd_lightning.training.run import build, build_module, train
from tests.hydra_utils import compose_cfg, group_options


@pytest.fixture()
def tiny_overrides(tiny_sdxl_dir, tmp_path):
    os.environ["TDD_ROOT"] = str(tmp_path)
    return [f"model.pretrained={tiny_sdxl_dir}", "model.build_if_missing=false"]


@pytest.mark.parametrize("group", ["target_selection", "guidance", "loss", "adversarial"])
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
        if group == "trainer" and option == "cpu":
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
def test_every_experiment_smoke_runs(experiment, tmp_path, tiny_overrides, tiny_sd15_dir, request):
    if experiment.startswith("sd15"):  # an SD1.5-family recipe: the tiny SD1.5 pipeline
        tiny_overrides = [f"model.pretrained={tiny_sd15_dir}", "model.build_if_missing=false"]
    if experiment.startswith("flux"):  # a FLUX recipe: the tiny guidance-distilled FLUX pipeline
        flux_dir = request.getfixturevalue("tiny_flux_dev_dir")
        tiny_overrides = [f"model.pretrained={flux_dir}", "model.build_if_missing=false", "model.lora.rank=4"]
    if experiment == "toy_flux_tdd":  # the shipped toy flow teacher (6 MiB, a true-CFG tiny FLUX) as it is
        teacher = Path(__file__).resolve().parents[1] / "models" / "toy-flow-teacher"
        tiny_overrides = [f"model.pretrained={teacher}"]
    overrides = [
        f"experiment={experiment}", *tiny_overrides, "model.base_dtype=fp32",
        "model.gradient_checkpointing=false",
        "data=synthetic", "data.batch_size=2", "data.num_samples=8", "trainer=cpu", "trainer.max_steps=2",
        "trainer.accumulate_grad_batches=1", "logger=csv", "callbacks.sample_grid.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]  # fmt: skip
    if experiment.startswith("toy_"):  # the full evaluations: see test_toy_eval.py, test_toy_flow_eval.py
        overrides += ["~callbacks.toy_eval", "~callbacks.toy_curves"]
    if experiment == "toy_tdd_long":  # its 50 warm-up steps must fit in the 2 steps (refused otherwise)
        overrides += ["lr_scheduler.lr_lambda.warmup_steps=1"]
    cfg = compose_cfg(overrides, tmp_path / "out")
    metrics = train(cfg)
    assert metrics["global_step"] == 2 and metrics["train/loss"] > 0
    assert (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "out" / "samples").glob("*.png"))


# ---- the config layout: loss by _target_, one file per callback, interpolated guidance, groups -------
def test_loss_targets_give_the_formulas_bit_for_bit(tmp_path):
    from tdd_lightning.diffusion import l2_loss, pseudo_huber_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    huber = build("loss", compose_cfg(["loss=huber"], tmp_path).loss)
    l2 = build("loss", compose_cfg(["loss=l2"], tmp_path).loss)
    assert torch.equal(huber(pred, target), pseudo_huber_loss(pred, target, 0.001).mean())
    assert torch.equal(l2(pred, target), l2_loss(pred, target).mean())
    zeros, ones = torch.zeros(2, 4), torch.ones(2, 4)
    assert huber(zeros, ones).item() == pytest.approx(math.sqrt(1 + 1e-6) - 0.001, rel=1e-6)
    assert huber.describe() == {"name": "huber", "c": 0.001} and l2.describe() == {"name": "l2"}


def test_a_bad_loss_knob_names_it(tmp_path):
    with pytest.raises(UserError, match=r"loss\.c="):
        build("loss", compose_cfg(["loss.c=0"], tmp_path).loss)


CALLBACK_SETS = {"default", "none", "smoke", "toy", "sdxl"}
DEFAULT_CALLBACKS = [
    "model_checkpoint", "retention", "lr_monitor", "samples_per_second", "time_histograms", "sample_grid",
    "skipped_samples", "preemption", "crash_checkpoint", "progress_bar", "lora_export",
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(set(group_options("callbacks")) - CALLBACK_SETS))
def test_every_callback_file_composes_alone(name, tmp_path, tiny_overrides):
    cfg = compose_cfg([f"callbacks={name}", "experiment=toy_tdd", *tiny_overrides], tmp_path)
    assert list(cfg.callbacks) == [name]
    callback = instantiate(cfg.callbacks[name])
    assert isinstance(callback, L.Callback)


def test_callback_sets_compose_the_files_in_order(tmp_path):
    def names(*overrides):
        return list(compose_cfg(list(overrides), tmp_path).callbacks)

    assert names("callbacks=default") == DEFAULT_CALLBACKS
    assert names("experiment=smoke") == names("experiment=sdxl_tdd") == DEFAULT_CALLBACKS
    assert names("experiment=toy_tdd") == [*DEFAULT_CALLBACKS, "toy_curves", "toy_eval"]
    assert names("experiment=toy_tdd", "callbacks=none") == names("callbacks=none") == []


def test_experiments_set_only_what_differs_from_the_callback_files(tmp_path):
    toy = compose_cfg(["experiment=toy_tdd"], tmp_path).callbacks
    assert toy.model_checkpoint.every_n_train_steps == 300 and toy.sample_grid.every_n_steps == 300
    assert len(toy.sample_grid.prompts) == 3 and toy.sample_grid.eta == 0.2 and toy.toy_eval.n == 1000
    smoke = compose_cfg(["experiment=smoke"], tmp_path).callbacks
    assert smoke.model_checkpoint.every_n_train_steps == 100 and smoke.sample_grid.every_n_steps == 150
    sdxl = compose_cfg(["experiment=sdxl_tdd"], tmp_path).callbacks
    assert sdxl.model_checkpoint.every_n_train_steps == 1000 and sdxl.sample_grid.every_n_steps == 1000
    assert sdxl.sample_grid.prompts == ["a photo of a cat", "a watercolor landscape with mountains"]


@pytest.mark.parametrize(
    "overrides, scale",
    [
        (["experiment=toy_tdd"], 4.0),
        (["experiment=toy_tdd", "guidance.w=1.5"], 2.5),
        (["experiment=toy_tdd", "guidance.w=0"], 1.0),
        (["callbacks=toy"], 4.5),  # guidance=decoupled's own w = 3.5
        (["callbacks=toy", "guidance=none"], 1.0),  # no w: no teacher CFG
    ],
)
def test_toy_teacher_guidance_follows_guidance_w(overrides, scale, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    value = cfg.callbacks.toy_eval.teacher_guidance
    assert isinstance(value, float) and value == scale


def test_the_trainer_group_has_one_cpu_base(tmp_path):
    assert "default" not in group_options("trainer")
    cpu = compose_cfg(["trainer=cpu"], tmp_path).trainer
    gpu = compose_cfg(["trainer=gpu"], tmp_path).trainer
    assert (cpu.accelerator, cpu.devices, gpu.accelerator, gpu.precision) == ("cpu", 1, "gpu", "bf16-mixed")
    changed = ("accelerator", "precision")  # everything else gpu.yaml takes from cpu.yaml
    assert {k: v for k, v in gpu.items() if k not in changed} == {
        k: v for k, v in cpu.items() if k not in changed
    }


def test_optimizer_group_default_is_adamw(tmp_path):
    cfg = compose_cfg(["experiment=toy_tdd"], tmp_path)
    factory = build("optimizer", cfg.optimizer)
    opt = factory(params=[torch.nn.Parameter(torch.zeros(2))])
    assert (
        type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 3e-4 and opt.defaults["weight_decay"] == 0.0
    )


def test_adamw8bit_without_bitsandbytes_is_one_line_at_build(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    cfg = compose_cfg(["experiment=toy_tdd", "optimizer=adamw8bit"], tmp_path)
    with pytest.raises(UserError) as e:
        build_module(cfg)
    message = str(e.value)
    assert message.startswith("optimizer: adamw8bit needs bitsandbytes") and "optimizer=adamw" in message
    assert "\n" not in message


def test_adamw8bit_with_bitsandbytes_is_its_partial(tmp_path, monkeypatch):
    class AdamW8bit:
        def __init__(self, params, **kwargs):
            self.params, self.kwargs = list(params), kwargs

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake.optim)
    cfg = compose_cfg(["experiment=toy_tdd", "optimizer=adamw8bit"], tmp_path)
    opt = build("optimizer", cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, AdamW8bit) and opt.kwargs == {"lr": 3e-4, "weight_decay": 0.0}


def test_the_module_is_built_from_its_target(tmp_path, tiny_overrides):
    cfg = compose_cfg(["experiment=toy_tdd", "module.ema_decay=0.5", "seed=7", "loss=l2"], tmp_path)
    assert cfg.module._target_ == "tdd_lightning.module.TDDModule"
    m = build_module(cfg)
    assert (m.ema_decay, m.seed, m.max_nonfinite_steps) == (0.5, 7, 10)
    assert type(m.distill_loss).__name__ == "L2Loss" and m.target_selection.N == 50
    assert m.hparams["loss"] == {"name": "l2"} and m.hparams["ema_decay"] == 0.5


def test_a_bare_run_is_the_smoke_run(tmp_path):
    bare = OmegaConf.to_container(compose_cfg([], tmp_path), resolve=False)
    smoke = OmegaConf.to_container(compose_cfg(["experiment=smoke"], tmp_path), resolve=False)
    bare.pop("hydra"), smoke.pop("hydra")
    assert bare == smoke and bare["task_name"] == "smoke" and bare["trainer"]["max_steps"] == 300
    # the smoke run's own data and callbacks are group options: swapping the group drops them
    swapped = compose_cfg(["data=cached", "callbacks=none"], tmp_path)
    assert "num_samples" not in swapped.data and list(swapped.callbacks) == []


def test_help_is_a_description_examples_and_the_groups():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, str(root / "train.py"), "--help"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "TDD_ROOT": str(root)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("train.py: Target-Driven Distillation")
    for example in (
        "python train.py experiment=toy_tdd",
        "python train.py experiment=sdxl_tdd model.pretrained=",
        "python train.py -m experiment=toy_tdd target_selection.s_ratio=0.0,0.3",
        "python train.py experiment=sdxl_tdd --cfg job",
    ):
        assert example in out, example
    assert "optimizer: adamw, adamw8bit" in out and "trainer: cpu, ddp, fsdp, gpu, slurm" in out
    assert "== Config ==" not in out and "task_name:" not in out  # not Hydra's composition dump
