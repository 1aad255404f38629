"""The toy evaluation: aggregation by hand, the settings grid, and the end of `experiment=toy_tdd` (a short
distillation of the shipped teacher on a small fresh cache) agreeing with `python -m tdd_lightning.toy.eval`
on the exported LoRA."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "toy-teacher"


def test_aggregate_mean_and_sample_std():
    from tdd_lightning.toy.report import aggregate, markdown_table

    recs = [
        {
            "model": "TDD",
            "steps": 4,
            "eta": 0.2,
            "guidance": 1.0,
            "seed": 0,
            "run": 0,
            "prompt_acc": 0.5,
            "fd": 10.0,
        },
        {
            "model": "TDD",
            "steps": 4,
            "eta": 0.2,
            "guidance": 1.0,
            "seed": 1,
            "run": 1,
            "prompt_acc": 0.7,
            "fd": 14.0,
        },
        {
            "model": "LCM",
            "steps": 4,
            "eta": 0.2,
            "guidance": 1.0,
            "seed": 0,
            "run": 0,
            "prompt_acc": 0.4,
            "fd": 20.0,
        },
    ]
    rows = aggregate(recs)
    tdd, lcm = rows
    assert (tdd["model"], tdd["n"], lcm["n"]) == ("TDD", 2, 1)
    assert tdd["prompt_acc"] == pytest.approx(0.6) and tdd["prompt_acc_std"] == pytest.approx(math.sqrt(0.02))
    assert tdd["fd"] == pytest.approx(12.0) and tdd["fd_std"] == pytest.approx(math.sqrt(8.0))
    assert math.isnan(lcm["fd_std"])
    table = markdown_table(rows).splitlines()
    assert table[2] == "| TDD | 4 | 0.2 | 1 | 2 | 0.600 ± 0.141 | 12.0 ± 2.8 | - |"
    assert table[3] == "| LCM | 4 | 0.2 | 1 | 1 | 0.400 | 20.0 | - |"


def test_grid_settings():
    from tdd_lightning.toy.runner import Grid

    grid = Grid([1, 4, 8], [0.2, 0.0], [1.0, 2.0], [0, 1], guidance_steps=[4], teacher_steps=[4, 50])
    cells = list(grid.student_settings([3]))
    # 3 steps x 2 etas at guidance 1, plus guidance 2 at eta 0.2 and 4 steps only
    assert len(cells) == 7 and all(c.seed == 3 for c in cells)
    assert [(c.steps, c.eta) for c in cells if c.guidance == 2.0] == [(4, 0.2)]
    teacher = list(grid.teacher_settings())
    assert [(c.steps, c.seed) for c in teacher] == [(50, 0), (4, 0), (50, 1), (4, 1)]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A small fresh two-object dataset and its latent cache made with the teacher's encoders."""
    from tdd_lightning.data.encode import encode_shards
    from tdd_lightning.data.shapes import ShapesConfig, make_shapes
    from tdd_lightning.models import load_sdxl_components
    from tdd_lightning.models.families.sdxl import SDXLEncoder

    root = tmp_path_factory.mktemp("toy")
    shapes = root / "shapes"
    make_shapes(shapes, ShapesConfig(difficulty="two", train=128, heldout=64, shards=1, seed=777))
    parts = load_sdxl_components(TEACHER)
    enc = SDXLEncoder(parts.vae, parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2)
    cache = root / "cache"
    encode_shards(
        str(shapes / "train" / "shard-*.tar"), cache, enc, resolution=32, num_workers=0, progress=False
    )
    return shapes, cache


def test_toy_tdd_prints_table_and_eval_cli_agrees(toy_data, tmp_path):
    shapes, cache = toy_data
    run = tmp_path / "run"
    common = ["n=16", "seed=5", f"cache_dir={tmp_path / 'cache'}", f"data={shapes}"]
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=toy_tdd", f"hydra.run.dir={run}",
        f"data.train_shards={cache}/shard-*.tar", "data.batch_size=8", "data.num_workers=0",
        "trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=100",
        "callbacks.model_checkpoint.every_n_train_steps=100", "callbacks.toy_eval.steps=[1,2]",
        "callbacks.toy_eval.etas=[0.0]", "callbacks.toy_eval.teacher_steps=[2,4]", "~callbacks.toy_curves",
        *[f"callbacks.toy_eval.{kv}" for kv in common],
    ]  # fmt: skip
    env = {**os.environ, "TDD_ROOT": str(ROOT)}  # the shipped teacher and evaluator
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Student after 3 steps vs the teacher" in out.stdout
    assert "| TDD student | 2 | 0 | 1 | 1 |" in out.stdout
    callback = json.loads((run / "eval" / "results.json").read_text())["records"]
    assert {(r["model"], r["steps"]) for r in callback} == {
        ("teacher DDIM", 4),
        ("teacher DDIM", 2),
        ("TDD student", 1),
        ("TDD student", 2),
    }
    assert (run / "eval" / "quality_vs_steps.png").is_file() and (run / "eval" / "grid.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    acc2 = next(r["prompt_acc"] for r in callback if r["model"] == "TDD student" and r["steps"] == 2)
    assert metrics["eval/prompt_acc/2steps_eta0"] == pytest.approx(acc2)

    # the exported LoRA through the stock pipeline (merged weights) gives the same cells
    ev = tmp_path / "ev"
    args = [
        "--student", f"TDD student={run}", "--steps", "1", "2", "--eta", "0", "--seeds", "5", "--n", "16",
        "--teacher-steps", "2", "4", "--ref-steps", "4", "--data", str(shapes), "--out", str(ev),
        "--cache-dir", str(tmp_path / "cache"), "--teacher-guidance", "4",  # toy_tdd's teacher: CFG 1 + w = 4
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "tdd_lightning.toy.eval", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = json.loads((ev / "results.json").read_text())["records"]
    from PIL import Image  # cached teacher cells still get their grid column

    assert Image.open(ev / "grid.png").size == Image.open(run / "eval" / "grid.png").size
    key = lambda r: (r["model"], r["steps"])  # noqa: E731
    for a, b in zip(sorted(callback, key=key), sorted(cli, key=key), strict=True):
        assert key(a) == key(b)
        assert a["prompt_acc"] == pytest.approx(b["prompt_acc"], abs=1 / 16 + 1e-9)
        assert a["agree"] == pytest.approx(b["agree"], rel=0.05, abs=0.5)


def test_eval_cli_errors(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tdd_lightning.toy.eval", "--student", "nopath", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 1 and "NAME=PATH" in out.stderr
    missing = f"X={tmp_path}/no"
    cmd = [sys.executable, "-m", "tdd_lightning.toy.eval", "--student", missing, "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_bench_targets_verdicts():
    from tdd_lightning.toy.bench import targets
    from tdd_lightning.toy.report import aggregate

    def rec(model, steps, acc, fd, guidance=1.0, eta=0.2, seed=0):
        return dict(
            model=model, steps=steps, eta=eta, guidance=guidance, seed=seed, run=seed, prompt_acc=acc, fd=fd
        )

    recs = []
    for seed in (0, 1):
        recs += [
            rec("teacher DDIM", 50, 0.60, 100.0, 3.0, 0.0, seed),
            rec("teacher DDIM", 4, 0.40, 160.0, 3.0, 0.0, seed),
            rec("teacher DDIM", 8, 0.57, 115.0, 3.0, 0.0, seed),
        ]
        recs += [rec("TDD", 4, 0.58, 108.0, seed=seed), rec("TDD", 8, 0.58, 120.0, seed=seed)]
        for k in (4, 8):
            recs += [rec("TDD", k, 0.62, 110.0, 2.0, seed=seed), rec("PCM", k, 0.55, 105.0, seed=seed)]
            recs += [rec("LCM", k, 0.50, 130.0, seed=seed), rec("TCD", k, 0.59, 125.0, seed=seed)]
    text = targets(aggregate(recs), 0.2).splitlines()
    # 0.58 / 0.60 = 0.97 >= 0.95 (met); FD 108 / 100 = 1.08 <= 1.1 (met); beats the teacher's 4-step DDIM
    assert "0.97x" in text[0] and "1.08x" in text[0] and text[0].count("**met**") == 2
    assert text[1].endswith("**met**.")
    # 8 steps: acc 0.58 >= 0.57 but FD 120 > 115: not at least as good on both
    assert "8-step DDIM" in text[2] and text[2].endswith("**missed**).")
    assert "4 steps, TDD vs LCM" in text[3] and text[3].endswith("**met**.")
    assert "TDD vs TCD" in text[4] and text[4].endswith("**missed**.")  # TCD has the higher accuracy
    assert "TDD vs PCM" in text[5] and text[5].endswith("**missed**.")  # PCM has the lower FD
    assert len(text) == 11 and all(line.endswith("**met**).") for line in text[9:])  # inference CFG helps
    recs = [
        r | {"fd": 112.0} if (r["model"], r["steps"], r["guidance"]) == ("TDD", 4, 1.0) else r for r in recs
    ]
    assert "1.12x" in targets(aggregate(recs), 0.2).splitlines()[0]
    assert targets(aggregate(recs), 0.2).splitlines()[0].count("**missed**") == 1  # FD above 1.1x
    # one run per model: numbers without a spread (no "± nan")
    single = targets(aggregate([r for r in recs if r["seed"] == 0]), 0.2).splitlines()[0]
    assert "prompt acc 0.580 = 0.97x the teacher's 0.600" in single and "nan" not in single


def test_student_spec_names_and_paths_may_hold_equals(tmp_path):
    from tdd_lightning.errors import UserError
    from tdd_lightning.toy.eval import resolve_student

    lora = tmp_path / "runs" / "p_empty=0.0" / "checkpoints" / "last_lora" / "student"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    run = lora.parents[2]
    name, path = resolve_student(f"TDD p_empty=0={run}")
    assert name == "TDD p_empty=0" and path == lora / "pytorch_lora_weights.safetensors"
    assert resolve_student(f"TDD={run}")[0] == "TDD"
    with pytest.raises(UserError, match="does not exist"):
        resolve_student(f"TDD={tmp_path}/none")


def test_teacher_cache_key_is_unchanged_by_the_shared_setting():
    """Teacher cells cached on disk before Setting moved to pipelines keep their keys (same JSON)."""
    import hashlib
    from types import SimpleNamespace

    from tdd_lightning.pipelines import Setting
    from tdd_lightning.toy.suite import Suite

    suite = SimpleNamespace(teacher_id="0123456789abcdef", n=1000, ref_steps=50, ref_guidance=2.0)
    raw = '["0123456789abcdef", 1000, 50, 2.0, {"steps": 4, "eta": 0.0, "guidance": 2.0, "seed": 1}]'
    assert Suite._cache_key(suite, Setting(4, 0.0, 2.0, 1)) == hashlib.sha256(raw.encode()).hexdigest()[:20]


def _losses(run: Path) -> dict[int, float]:
    import csv

    rows = csv.DictReader(open(next(run.glob("csv/version_*/metrics.csv"))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_quality_curves_during_training(toy_data, tmp_path):
    """Every 2 steps the student and the evaluation EMA are scored and logged as eval/... and eval_ema/...
    series (csv), curves.csv and the plot are written, and the evaluations leave training unchanged."""
    import csv

    shapes, cache = toy_data
    common = [
        sys.executable, str(ROOT / "train.py"), "experiment=toy_tdd",
        f"data.train_shards={cache}/shard-*.tar", "data.batch_size=8", "data.num_workers=0",
        "trainer.max_steps=4", "trainer.log_every_n_steps=1",
        "callbacks.sample_grid.every_n_steps=100", "callbacks.model_checkpoint.every_n_train_steps=100",
        "~callbacks.toy_eval",
    ]  # fmt: skip
    curves = [
        "callbacks.toy_curves.every_n_steps=2", "callbacks.toy_curves.n=16", "callbacks.toy_curves.steps=[2]",
        "callbacks.toy_curves.etas=[0.0]", "callbacks.toy_curves.teacher_steps=4",
        f"callbacks.toy_curves.data={shapes}", f"callbacks.toy_curves.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    env = {**os.environ, "TDD_ROOT": str(ROOT)}
    run, plain = tmp_path / "run", tmp_path / "plain"
    for cmd in (
        [*common, *curves, f"hydra.run.dir={run}"],
        [*common, "~callbacks.toy_curves", f"hydra.run.dir={plain}"],
    ):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(run / "eval" / "curves.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    keys = {f"{p}/{m}/2steps_eta0" for p in ("eval", "eval_ema") for m in ("prompt_acc", "fd", "agree")}
    assert set(rows[0]) == {"step", *keys}
    for r in rows:
        acc = float(r["eval/prompt_acc/2steps_eta0"])
        assert 0 <= acc <= 1 and round(acc * 16) == acc * 16  # a fraction of the 16 prompts
    logged = list(csv.DictReader(open(next(run.glob("csv/version_*/metrics.csv")))))
    series = {
        int(r["step"]): float(r["eval_ema/fd/2steps_eta0"])
        for r in logged
        if r.get("eval_ema/fd/2steps_eta0")
    }
    assert series == {int(r["step"]): pytest.approx(float(r["eval_ema/fd/2steps_eta0"])) for r in rows}
    assert (run / "eval" / "quality_curves.png").is_file()
    assert _losses(run) == _losses(plain) and len(_losses(run)) == 4


def test_renoising_draws_are_independent_of_the_initial_noise(monkeypatch):
    """Regression: the eta re-noising generator was seeded like x_T, so the first batch's first re-noising
    draw WAS its initial noise (eta > 0 cells of the first 250 prompts scored 0.38 instead of ~0.52)."""
    from types import SimpleNamespace

    import torch

    from tdd_lightning.toy import sampling

    seen = {}

    def fake_sample(eps_fn, x_T, timesteps, schedule, eta=0.0, generator=None, **kw):
        seen["z"] = torch.randn(x_T.shape, generator=generator)  # what the first re-noising would draw
        return x_T

    monkeypatch.setattr(sampling, "tdd_sample", fake_sample)
    from tdd_lightning.models.families.sdxl import SDXL

    monkeypatch.setattr(SDXL, "unconditional_like", lambda *args: args[-2])  # (..., c, None) -> c
    vae = SimpleNamespace(
        config=SimpleNamespace(scaling_factor=1.0),
        dtype=torch.float32,
        decode=lambda z: SimpleNamespace(sample=z),
    )
    x_T = sampling.initial_noise(64, seed=3)
    sampling.sample_images(
        None, vae, {"prompt_embeds": torch.zeros(64, 1)}, x_T, [999, 499], 1.0, None, eta=0.2, seed=3
    )
    corr = torch.corrcoef(torch.stack([seen["z"].flatten(), x_T.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05  # 4096 draws: independent streams
    again = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(sampling.renoise_seed(3)))
    assert torch.equal(seen["z"], again)  # still a function of the sampling seed: cells are reproducible


def test_warm_caches_exactly_the_cells_the_run_reads(toy_data, tmp_path):
    """``toy.warm`` samples the teacher cells of the composed run config; a suite built as the callback
    builds it then reads every one from the cache, equal to the same cells computed without a cache."""
    from tdd_lightning.pipelines import Setting
    from tdd_lightning.toy.callback import ToyEvaluation, teacher_suite

    shapes, _ = toy_data
    cache = tmp_path / "cache"
    common = ["n=16", "seed=5", f"cache_dir={cache}", f"data={shapes}"]
    overrides = [
        "experiment=toy_tdd", "callbacks.toy_eval.teacher_steps=[2,4]",
        "callbacks.toy_curves.teacher_steps=3",
        *[f"callbacks.toy_eval.{kv}" for kv in common], *[f"callbacks.toy_curves.{kv}" for kv in common],
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "tdd_lightning.toy.warm", *overrides]
    env = {**os.environ, "TDD_ROOT": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "toy_eval: teacher cells ready" in out.stdout and "toy_curves: teacher cells ready" in out.stdout
    # cells of 2 and 4 steps; references: 4 steps (the table's) and 3 steps (the curves')
    assert len(list(cache.glob("*.json"))) == 2 and len(list(cache.glob("*.pt"))) == 2

    evaluation = ToyEvaluation(
        str(ROOT / "models/toy-evaluator"), str(shapes), teacher_steps=[2, 4], teacher_guidance=4.0,
        n=16, seed=5, cache_dir=str(cache), progress=False,
    )  # fmt: skip
    kwargs = evaluation.suite_kwargs()
    inputs = (str(TEACHER), "zeros", evaluation.evaluator, str(shapes))
    warmed, fresh = teacher_suite(*inputs, **kwargs), teacher_suite(*inputs, **kwargs | {"cache_dir": None})
    for s in evaluation.grid().teacher_settings():
        cached, images = warmed.teacher_cell(s)
        assert images is None and cached["seconds"] == 0.0  # read, not sampled
        computed, _ = fresh.teacher_cell(s)
        for m in ("prompt_acc", "fd", "agree"):
            assert cached[m] == pytest.approx(computed[m], rel=1e-6, abs=1e-9), (s, m)
    assert s == Setting(2, 0.0, 4.0, 5)  # the reference (4 steps) came first


def test_warm_without_toy_callbacks_or_with_a_typo():
    cmd = [sys.executable, "-m", "tdd_lightning.toy.warm", "model=tiny"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "nothing to warm" in out.stdout, out.stderr[-2000:]
    cmd = [sys.executable, "-m", "tdd_lightning.toy.warm", "experiment=toy_tdd", "callbacks.toy_eval.nn=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "callbacks.toy_eval.nn" in out.stderr and "Traceback" not in out.stderr
