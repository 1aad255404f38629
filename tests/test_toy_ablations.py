"""The paper's ablations on the toy (toy.ablations) and the evaluation's --scheduler settings: the cells and
tables, which jobs a sweep (re)launches, and that a scheduler setting really changes how students sample."""

import json
import subprocess
import sys

import pytest

from tdd_lightning.errors import UserError
from tdd_lightning.scheduling_tdd import TDDScheduler
from tdd_lightning.toy import ablations
from tdd_lightning.toy.eval import scheduler_overrides, with_config
from tdd_lightning.toy.report import aggregate
from tdd_lightning.toy.suite import student_timesteps


def test_cells_are_the_grid_the_evaluation_runs():
    assert ablations.cells(("--steps", "4", "8", "--eta", "0", "0.2")) == [
        (4, 0.0, 1.0), (8, 0.0, 1.0), (4, 0.2, 1.0), (8, 0.2, 1.0),
    ]  # fmt: skip
    # guidances past the first: at the first eta only (runner.Grid.student_settings)
    assert ablations.cells(("--steps", "4", "--eta", "0.2", "--guidance", "1", "1.5", "2")) == [
        (4, 0.2, 1.0), (4, 0.2, 1.5), (4, 0.2, 2.0),
    ]  # fmt: skip
    assert ablations.cells(("--steps", "5", "6")) == [(5, 0.2, 1.0), (6, 0.2, 1.0)]  # toy.eval's default eta


def test_table_is_mean_and_std_over_seeds_per_variant():
    def rec(model, seed, acc, fd, eta=0.0):
        return dict(model=model, steps=4, eta=eta, guidance=1.0, seed=seed, run=seed, prompt_acc=acc, fd=fd)

    rows = aggregate([rec("0.0", 0, 0.50, 100.0), rec("0.0", 1, 0.54, 104.0), rec("0.3", 0, 0.60, 90.0)])
    text = ablations.table(rows, ["0.0", "0.3", "0.15"], ("--steps", "4", "--eta", "0"), "s_ratio")
    lines = text.splitlines()
    assert lines[0] == "| s_ratio | 4 st. eta 0 |"
    assert lines[2].startswith("| 0.0 | 0.520 ± ") and " / 102.0 ± " in lines[2]
    std = float(lines[2].split("± ")[1].split(" ")[0])
    assert std == pytest.approx(0.028, abs=0.0015)  # sample std of 0.50, 0.54
    assert lines[3] == "| 0.3 | 0.600 / 90.0 |"  # one run: no spread to show
    assert lines[4] == "| 0.15 | n/a |"  # a variant not evaluated says so


def test_a_sweep_launches_only_its_missing_jobs(tmp_path, monkeypatch):
    sw = ablations.Sweep("s_ratio", "t", "target_selection.s_ratio", ("0.0", "0.3"), ())
    done = ablations.job_dir(tmp_path / "ablations" / "s_ratio", "0.0", 0)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"global_step": 600}))
    half = ablations.job_dir(tmp_path / "ablations" / "s_ratio", "0.3", 1)
    half.mkdir(parents=True)
    (half / "metrics.json").write_text('{"global_st')  # killed while writing: train again
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    jobs = ablations.train_sweep(sw, [0, 1], tmp_path, ["trainer.max_steps=2"])
    assert [j.name for j in jobs] == ["0.0_seed0", "0.0_seed1", "0.3_seed0", "0.3_seed1"]
    train = [c for c in calls if "train.py" in c[1]]
    assert [(c[c.index("-m") + 2], next(a for a in c if a.startswith("seed="))) for c in train] == [
        ("target_selection.s_ratio=0.0", "seed=1"),
        ("target_selection.s_ratio=0.3", "seed=0,1"),
    ]
    assert all("ckpt_path=auto" in c and "trainer.max_steps=2" in c for c in train)
    assert "hydra.sweep.subdir=0.3_seed${seed}" in train[1]
    assert calls[-1][1:3] == ["-m", "tdd_lightning.training.sweep_report"]


def test_sampler_ablations_need_the_benchmark_tdd_students(tmp_path):
    with pytest.raises(ValueError, match="TDD students"):
        ablations.run(["schedule"], [0], tmp_path, tmp_path, [])


def test_scheduler_overrides_are_yaml_values_and_unknown_keys_are_refused():
    assert scheduler_overrides(["schedule=equidistant", "clip_sample=true", "clip_steps=1", "x=null"]) == {
        "schedule": "equidistant", "clip_sample": True, "clip_steps": 1, "x": None,
    }  # fmt: skip
    with pytest.raises(UserError, match="KEY=VALUE"):
        scheduler_overrides(["schedule"])
    with pytest.raises(UserError, match="clip_step: not in TDDScheduler's config"):
        with_config(TDDScheduler(), {"clip_step": 1})
    with pytest.raises(UserError, match="schedule"):
        with_config(TDDScheduler(), {"schedule": "nonsense"})


def test_schedule_and_clipping_settings_reach_the_student_sampler():
    exported = TDDScheduler()  # schedule auto: non-equidistant for K = 5..7
    equi = with_config(exported, {"schedule": "equidistant"})
    assert student_timesteps(exported)(6) == [999, 875, 751, 627, 499, 251]
    assert student_timesteps(equi)(6) == [999, 835, 667, 499, 335, 167]
    assert student_timesteps(equi)(4) == student_timesteps(exported)(4)  # K_min: the same schedule
    clipping = with_config(exported, scheduler_overrides(ablations.SAMPLERS[1].variants["t_l = 1"]))
    assert (
        clipping.config.clip_sample and clipping.config.clip_steps == 1 and exported.config.clip_steps is None
    )


def test_eval_cli_refuses_an_unknown_scheduler_key(tmp_path):
    from pathlib import Path

    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"")
    cmd = [sys.executable, "-m", "tdd_lightning.toy.eval", "--student", f"X={lora}", "--scheduler", "nope"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 1 and "KEY=VALUE" in out.stderr


def test_bench_page_holds_the_ablation_sections_after_the_cells():
    from tdd_lightning.toy.bench import page

    meta = {
        "argv": [], "machine": "2 CPU cores", "train_minutes": [27.0, 26.0], "eval_minutes": 20.0,
        "experiment": "toy_tdd_long", "budget": "1800 steps", "seeds": [0, 1], "targets": "- t",
        "ablations": ["### s_ratio\n\n| s_ratio |", "### schedule\n\n| sampler |"],
    }  # fmt: skip
    text = page("| cells |", meta, [])
    assert "`experiment=toy_tdd_long` (1800 steps)" in text and "53 min (26.0 to 27.0 min each)" in text
    assert (
        text.index("## All cells")
        < text.index("## Ablations")
        < text.index("### s_ratio")
        < text.index("### schedule")
    )
    assert "## Ablations" not in page("| cells |", meta | {"ablations": []}, [])
