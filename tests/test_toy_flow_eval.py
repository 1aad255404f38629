"""The toy evaluation of flow students (issue 17, item 6): the suite's teacher cells on the shipped toy flow
teacher are FluxPipeline's own Euler samples with true CFG against "", a flow scheduler's K-step schedule
is read as grid indices, and `experiment=toy_flux_tdd` (a short distillation on a small fresh cache) prints
the table and agrees with `python -m tdd_lightning.toy.eval --teacher models/toy-flow-teacher`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FLOW_TEACHER = ROOT / "models" / "toy-flow-teacher"
EVALUATOR = ROOT / "models" / "toy-evaluator"


@pytest.fixture(scope="module")
def flow_data(tmp_path_factory):
    """A small fresh two-object dataset and its latent cache made with the flow teacher's encoders."""
    from tdd_lightning.data.encode import encode_shards
    from tdd_lightning.data.shapes import ShapesConfig, make_shapes
    from tdd_lightning.models.families.flux import FluxEncoder

    root = tmp_path_factory.mktemp("toy_flow")
    shapes = root / "shapes"
    make_shapes(shapes, ShapesConfig(difficulty="two", train=128, heldout=64, shards=1, seed=778))
    cache = root / "cache"
    encoder = FluxEncoder.from_pretrained(FLOW_TEACHER)
    encode_shards(
        str(shapes / "train" / "shard-*.tar"), cache, encoder, resolution=32, num_workers=0, progress=False
    )
    return shapes, cache


def test_family_of_folder(tmp_path):
    from tdd_lightning.models.families import family_of_folder

    assert family_of_folder(FLOW_TEACHER) == "flux"
    assert family_of_folder(ROOT / "models" / "toy-teacher") == "sdxl"
    assert family_of_folder(tmp_path) is None
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomeOtherPipeline"}))
    assert family_of_folder(tmp_path) is None


def test_suite_teacher_cells_are_flux_pipeline_euler_with_true_cfg(flow_data):
    """Suite.images on the flow teacher (tdd_sample on the flow schedule, eta 0) = FluxPipeline's images
    from the same noise, K steps, true_cfg_scale g against the negative prompt "" (up to uint8 rounding)."""
    from diffusers import FluxPipeline

    from tdd_lightning.pipelines import Setting
    from tdd_lightning.toy.flow_sampling import pack
    from tdd_lightning.toy.sampling import initial_noise, trailing_timesteps
    from tdd_lightning.toy.suite import Suite

    shapes, _ = flow_data
    n = 4
    suite = Suite.from_teacher(FLOW_TEACHER, EVALUATOR, shapes, n=n, cache_dir=None, progress=False)
    assert (suite.family.name, suite.uncond, suite.teacher_name) == ("flux", "empty_prompt", "teacher Euler")
    pipe = FluxPipeline.from_pretrained(FLOW_TEACHER, torch_dtype=torch.float32)
    for k, g in ((3, 2.5), (2, 1.0)):
        ours = suite.images(suite.unet, trailing_timesteps(k), Setting(k, 0.0, g, 0)).float()
        kw = {"negative_prompt": [""] * n, "true_cfg_scale": g} if g > 1 else {}
        ref = pipe(
            suite.captions, latents=pack(initial_noise(n, 0)), num_inference_steps=k, height=32, width=32,
            max_sequence_length=pipe.tokenizer_2.model_max_length, output_type="pt", **kw,
        ).images  # fmt: skip
        ref = (ref.clamp(0, 1) * 255).round()
        assert ours.shape == ref.shape
        # float rounding (our batched cond/uncond forward and cond + w (cond - uncond) against the pipeline's
        # two forwards and uncond + g (cond - uncond)), amplified by few large steps and quantised to uint8:
        # measured max 4 levels, mean 0.085, 1% of values off by > 1 at 3 steps CFG 2.5; 0 at 50 steps CFG 3
        d = (ours - ref).abs()
        assert d.max() <= 8 and d.mean() < 0.3 and (d > 1).float().mean() < 0.03


def test_flow_scheduler_schedule_is_read_as_grid_indices():
    """A TDDFlowScheduler's K-step schedule (timesteps = sigma * T) is read as the same grid indices as a
    TDDScheduler's of the same trained grid: what the module's sampler takes."""
    from tdd_lightning.scheduling_tdd import TDDScheduler
    from tdd_lightning.scheduling_tdd_flow import TDDFlowScheduler
    from tdd_lightning.toy.suite import student_timesteps

    grid = {"num_teacher_steps": 50, "k_min": 4, "k_max": 8}
    flow = student_timesteps(TDDFlowScheduler(use_dynamic_shifting=True, **grid))
    eps = student_timesteps(TDDScheduler(**grid))
    for k in (1, 2, 4, 6, 8):
        assert flow(k) == eps(k) and len(flow(k)) == k
        assert all(isinstance(t, int) for t in flow(k)) and flow(k) == sorted(flow(k), reverse=True)


def test_toy_flux_tdd_prints_table_and_eval_cli_agrees(flow_data, tmp_path):
    shapes, cache = flow_data
    run = tmp_path / "run"
    common = ["n=16", "seed=5", f"cache_dir={tmp_path / 'cache'}", f"data={shapes}"]
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=toy_flux_tdd", f"hydra.run.dir={run}",
        f"data.train_shards={cache}/shard-*.tar", "data.batch_size=8", "data.num_workers=0",
        "trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=100",
        "callbacks.model_checkpoint.every_n_train_steps=100", "callbacks.toy_eval.steps=[1,2]",
        "callbacks.toy_eval.etas=[0.0,0.2]", "callbacks.toy_eval.teacher_steps=[2,4]",
        "~callbacks.toy_curves",
        *[f"callbacks.toy_eval.{kv}" for kv in common],
    ]  # fmt: skip
    env = {**os.environ, "TDD_ROOT": str(ROOT)}  # the shipped flow teacher and evaluator
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Student after 3 steps vs the teacher" in out.stdout
    assert "| TDD student | 2 | 0.2 | 1 | 1 |" in out.stdout
    callback = json.loads((run / "eval" / "results.json").read_text())["records"]
    assert {(r["model"], r["steps"], r["eta"]) for r in callback} == {
        ("teacher Euler", 4, 0.0),
        ("teacher Euler", 2, 0.0),
        *{("TDD student", k, e) for k in (1, 2) for e in (0.0, 0.2)},
    }
    assert (run / "eval" / "grid.png").is_file() and (run / "checkpoints" / "last_lora" / "student").is_dir()

    # the exported LoRA in the stock FluxPipeline (merged weights) gives the same cells
    ev = tmp_path / "ev"
    args = [
        "--student", f"TDD student={run}", "--teacher", str(FLOW_TEACHER), "--steps", "1", "2",
        "--eta", "0", "0.2", "--seeds", "5", "--n", "16", "--teacher-steps", "2", "4", "--ref-steps", "4",
        "--data", str(shapes), "--out", str(ev), "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "tdd_lightning.toy.eval", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = json.loads((ev / "results.json").read_text())["records"]
    key = lambda r: (r["model"], r["steps"], r["eta"])  # noqa: E731
    for a, b in zip(sorted(callback, key=key), sorted(cli, key=key), strict=True):
        assert key(a) == key(b)
        assert a["prompt_acc"] == pytest.approx(b["prompt_acc"], abs=1 / 16 + 1e-9)
        assert a["agree"] == pytest.approx(b["agree"], rel=0.05, abs=0.5)
