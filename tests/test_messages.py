"""One line naming the key (issue 14, item 14): sample.py's steps/eta/guidance_scale, an infinite CFG scale,
ema_decay=1.0 (a warning), and the shard-pattern command of docs/data.md run through a real shell."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tdd_lightning.errors import ConfigError, UserError
from tdd_lightning.strategies import DecoupledGuidance, LCMRangeGuidance
from tdd_lightning.training.building import check_cheap
from tests.hydra_utils import compose_cfg
from tests.test_sample import compose_sample, load_sample_app

ROOT = Path(__file__).resolve().parents[1]


# ---- sample.py ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=0", "steps=0 is invalid: must be null, an integer >= 1 or a list of them"),
        ("steps=2.5", "steps=2.5 is invalid: must be null, an integer >= 1"),
        ("steps=[2,0]", "steps=[2, 0] is invalid: must be null, an integer >= 1"),
        ("steps=[]", "steps=[] is invalid"),
        ("steps=four", "steps='four' is invalid"),
        ("steps=true", "steps=True is invalid"),
        ("eta=1.5", "eta=1.5 is invalid: must be null, a number in [0, 1] or a list of them"),
        ("eta=-0.1", "eta=-0.1 is invalid"),
        ("eta=[0,nan]", "eta=[0, nan] is invalid"),
        ("guidance_scale=-1", "guidance_scale=-1 is invalid: must be null, a number >= 0 (1: no CFG)"),
        ("guidance_scale=inf", "guidance_scale=inf is invalid"),
        ("batch=0", "batch=0 is invalid: must be an integer >= 1"),
        ("height=100", "height=100 is invalid: must be null or a positive multiple of 8"),
        ("lora_scale=nan", "lora_scale=nan is invalid: must be a finite number"),
        ("dtype=fp8", "dtype='fp8' is invalid: choose auto, "),
    ],
)
def test_bad_sample_options_name_the_key_before_anything_loads(tmp_path, override, message):
    """The LoRA and base do not exist: a check made after loading would report them instead."""
    cfg = compose_sample(
        ["lora=/no/such/lora.safetensors", "base=/no/such/base", override, f"out_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as e:
        load_sample_app().run(cfg)
    assert e.value.key == override.split("=")[0]
    assert not (tmp_path / "images").exists()


def test_good_sample_options_pass_the_check():
    app = load_sample_app()
    for overrides in (
        [],
        ["steps=[1,2,4]", "eta=[0,0.2,1]", "guidance_scale=[0,1,7.5]"],
        ["height=64", "width=64"],
    ):
        app.check_options(compose_sample(["lora=null", *overrides]))  # no error


def test_a_bad_sample_option_is_one_line_from_the_command(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TDD_ROOT=str(tmp_path))
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "lora=/no/such/lora.safetensors", "eta=2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "error: eta=2 is invalid: must be null, a number in [0, 1] or a list of them"
    )


# ---- guidance ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, key",
    [
        (lambda: DecoupledGuidance(w=math.inf), "w"),
        (lambda: DecoupledGuidance(w=math.nan), "w"),
        (lambda: DecoupledGuidance(w_min=1.0, w_max=math.inf), "w_max"),
        (lambda: DecoupledGuidance(w_min=math.inf, w_max=math.inf), "w_min"),
        (lambda: LCMRangeGuidance(w_max=math.inf), "w_max"),
        (lambda: LCMRangeGuidance(w_min=math.nan), "w_min"),
        (lambda: DecoupledGuidance(p_empty=math.nan), "p_empty"),
    ],
)
def test_non_finite_cfg_scales_are_refused(factory, key):
    with pytest.raises(ConfigError) as e:
        factory()
    assert e.value.key == key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["guidance.w=inf"], "guidance.w=inf is invalid: must be a finite number >= 0"),
        (["guidance.w=nan"], "guidance.w=nan is invalid: must be a finite number >= 0"),
        (
            ["guidance=lcm_range", "guidance.w_max=inf"],
            "guidance.w_max=inf is invalid: must be a finite number",
        ),
    ],
)
def test_an_infinite_cfg_scale_is_one_line_at_start_up(tmp_path, overrides, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        check_cheap(compose_cfg(overrides, tmp_path))


# ---- ema_decay=1.0 ----------------------------------------------------------------------------------
def test_ema_decay_one_warns_once_at_start_up(tmp_path):
    from tdd_lightning.training.run import check_config

    with pytest.warns(UserWarning, match=r"^module\.ema_decay=1\.0: the EMA target never moves") as caught:
        check_config(compose_cfg(["module.ema_decay=1.0"], tmp_path))
    assert sum("ema_decay" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.999 (a slow target) is fine
        check_config(compose_cfg(["module.ema_decay=0.999"], tmp_path / "b"))


# ---- the shard-pattern command -------------------------------------------------------------------------
SHARDS = "/data/cache/train/{000000..000999}.tar"
WORKS = """'data.train_shards="/data/cache/train/{000000..000999}.tar"'"""  # Hydra quotes inside shell quotes
BROKEN = 'data.train_shards="/data/cache/train/{000000..000999}.tar"'  # the README's old form


def composed(override: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``python train.py experiment=sdxl_tdd <override> --cfg job`` typed into bash as it stands."""
    line = f"{shlex.quote(sys.executable)} train.py experiment=sdxl_tdd {override} --cfg job"
    env = {**os.environ, "TDD_ROOT": str(tmp_path)}
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_the_documented_shard_pattern_command_works_in_a_shell(tmp_path):
    docs = (ROOT / "docs" / "data.md").read_text()
    assert f"    {WORKS}" in docs  # the command in docs/data.md is the one tested here
    good = composed(WORKS, tmp_path)
    assert good.returncode == 0, good.stderr
    assert yaml.safe_load(good.stdout)["data"]["train_shards"] == SHARDS
    bad = composed(BROKEN, tmp_path)  # the shell strips the double quotes: Hydra sees bare braces
    assert bad.returncode == 1 and "mismatched input '{'" in bad.stderr
