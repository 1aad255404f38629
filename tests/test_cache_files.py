"""Cache and report files are never half-written, and a bad one is recomputed, not a crash (issue 14, item 9).

The toy evaluation's teacher cache (cells as JSON, reference features as tensors): a truncated, corrupt,
mismatched or wrongly shaped file is deleted with a warning and recomputed to the same numbers; the
temp files of a writer killed by SIGKILL are removed when the cache opens and when a training run
starts; readers of a killed job's files (sweep report, toy benchmark) report instead of crashing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdd_lightning.checkpoint_io import remove_stale_temp_files
from tdd_lightning.pipelines import Setting
from tdd_lightning.toy.cache import CacheWarning, TeacherCache

ROOT = Path(__file__).resolve().parents[1]
CELL, REF = Setting(1, 0.0, 2.0, 0), Setting(2, 0.0, 2.0, 0)  # a teacher cell; the reference (ref_steps 2)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


# ---- the temp files of killed writers -----------------------------------------------------------------
def test_a_writer_killed_mid_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    """SIGKILL inside atomic_write: the target is untouched and the orphan goes at the next open."""
    script = (
        "import sys, time\n"
        "from tdd_lightning.checkpoint_io import atomic_write\n"
        "def slow(tmp):\n"
        "    tmp.write_text('{\"half\": ')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(tmp_path / 'cell.json')!r}, slow)\n"
    )
    (tmp_path / "cell.json").write_text('{"old": 1}')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline().strip() == "writing"
    orphan = tmp_path / f".cell.json.tmp-{writer.pid}"
    assert orphan.is_file()
    TeacherCache(tmp_path)  # the writer is alive: its temp file stays
    assert orphan.is_file()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert orphan.is_file() and json.loads((tmp_path / "cell.json").read_text()) == {"old": 1}
    TeacherCache(tmp_path)  # the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.json"]


def test_only_temp_files_of_dead_writers_are_removed(tmp_path):
    dead, mine = dead_pid(), os.getpid()
    names = [f".a.ckpt.tmp-{dead}", f".b.json.tmp-{mine}", "a.ckpt", f"a.tmp-{dead}", f".c.tmp-{dead}x"]
    for name in names:
        (tmp_path / name).write_text("x")
    deep = tmp_path / "step_0000002_lora" / "student"
    deep.mkdir(parents=True)
    (deep / f".pytorch_lora_weights.safetensors.tmp-{dead}").write_text("x")
    assert remove_stale_temp_files(tmp_path) == [tmp_path / f".a.ckpt.tmp-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names[1:]) | {"step_0000002_lora"})
    assert remove_stale_temp_files(tmp_path, depth=2) == [
        deep / f".pytorch_lora_weights.safetensors.tmp-{dead}"
    ]
    assert list(deep.iterdir()) == [] and remove_stale_temp_files(tmp_path / "none") == []


def test_a_training_run_removes_the_temp_files_of_a_killed_save(tiny_sdxl_dir, tmp_path):
    from tdd_lightning.training.run import train
    from tests.hydra_utils import compose_cfg
    from tests.test_run_folder import smoke

    dead = dead_pid()
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_0000002_lora" / "student").mkdir(parents=True)
    orphans = [ckpts / f".last.ckpt.tmp-{dead}", ckpts / "step_0000002_lora" / "student" / f".x.tmp-{dead}"]
    for orphan in orphans:
        orphan.write_bytes(b"half a checkpoint")
    assert train(compose_cfg(smoke(tiny_sdxl_dir), tmp_path / "run"))["global_step"] == 2
    assert not any(o.exists() for o in orphans)
    assert (ckpts / "last.ckpt").is_file()


# ---- the teacher cache, end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tdd_lightning.data.shapes import ShapesConfig, make_shapes

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, ShapesConfig(difficulty="two", train=4, heldout=8, shards=1, seed=11))
    return out


def suite(shapes, cache_dir):
    from tdd_lightning.toy.suite import Suite

    return Suite.from_teacher(
        ROOT / "models" / "toy-teacher", ROOT / "models" / "toy-evaluator", shapes, n=4, ref_steps=2,
        ref_guidance=2.0, cache_dir=cache_dir, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def computed(shapes, tmp_path_factory):
    """One cell computed from scratch (no cache), and a cache holding it and its reference."""
    cache = tmp_path_factory.mktemp("cache")
    first = suite(shapes, cache)
    res, images = first.teacher_cell(CELL)
    assert images is not None  # computed, not read
    keys = {"cell": first._cache_key(CELL), "ref": first._cache_key(REF)}
    return res, cache, keys, first.reference_features(0).clone()


def without_seconds(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k != "seconds"}


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_other_key(path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"key": "0" * 20, "cell": json.loads(path.read_text())["cell"]}))
    else:
        torch.save({"key": "0" * 20, "features": torch.load(path, weights_only=True)["features"]}, path)


def corrupt_shape(path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({"key": path.stem, "cell": {"fd": 1.0}}))  # metrics missing
    else:
        torch.save({"key": path.stem, "features": torch.zeros(3, 2, dtype=torch.float64)}, path)


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot a cache file")


@pytest.mark.parametrize("which", ["cell", "ref"])
@pytest.mark.parametrize(
    "corrupt", [corrupt_truncate, corrupt_other_key, corrupt_shape, corrupt_garbage],
    ids=["truncated", "other-key", "wrong-shape", "garbage"],
)  # fmt: skip
def test_a_bad_cache_file_is_recomputed_with_a_warning(shapes, computed, tmp_path, which, corrupt):
    res, cache, keys, ref = computed
    folder = tmp_path / "cache"
    folder.mkdir()
    for f in cache.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    bad = folder / f"{keys[which]}{'.json' if which == 'cell' else '.pt'}"
    corrupt(bad)
    again = suite(shapes, folder)
    with pytest.warns(CacheWarning, match=rf"{bad.name} is unusable .*deleted, recomputing"):
        res2, images = again.teacher_cell(CELL)
        feats = again.reference_features(0)
    assert (images is None) == (which == "ref")  # a good cell is still read; a bad one is sampled again
    assert without_seconds(res2) == without_seconds(res) and torch.equal(feats, ref)
    # the recomputed entry was written back, whole: a third run reads everything from the cache
    third = suite(shapes, folder)
    assert third.teacher_cell(CELL)[1] is None and torch.equal(third.reference_features(0), ref)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in cache.iterdir())


def test_cache_files_from_before_keys_were_recorded_are_still_read(tmp_path):
    cache = TeacherCache(tmp_path)
    cell = {"prompt_acc": 0.5, "fd": 12.0, "agree": 3.0, "acc_axis": 1.0, "seconds": 4.0}
    (tmp_path / "k1.json").write_text(json.dumps(cell))  # the old format: the bare metrics
    feats = torch.rand(4, 6, dtype=torch.float64)
    torch.save(feats, tmp_path / "k2.pt")  # the old format: the bare tensor
    assert cache.read_cell("k1") == cell and torch.equal(cache.read_features("k2", (4, 6)), feats)
    with pytest.warns(CacheWarning, match="expected torch.float64 \\(5, 6\\)"):
        assert cache.read_features("k2", (5, 6)) is None
    assert not (tmp_path / "k2.pt").exists()


def test_a_cache_that_cannot_be_written_warns_and_goes_on(tmp_path):
    (tmp_path / "file").write_text("")
    cache = TeacherCache(tmp_path / "file")  # a "folder" that is a file: every write fails
    with pytest.warns(CacheWarning, match="could not write"):
        cache.write_cell("k", {"prompt_acc": 0.5, "fd": 1.0, "agree": 1.0})
    assert cache.read_cell("k") is None


# ---- readers of a killed job's files ------------------------------------------------------------------
def test_sweep_report_names_a_truncated_metrics_file_and_reports_the_rest(tmp_path, capsys):
    from tdd_lightning.training import sweep_report

    for job, metrics in (("0", '{"train/loss": 0.25, "global_step": 4}'), ("1", '{"train/loss": 0.')):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- guidance.p_empty=0.{job}\n")
        (tmp_path / job / "metrics.json").write_text(metrics)
    assert sweep_report.main([str(tmp_path)]) == 0
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2] == "| 0 | 0.0 | 0.25 | - | 4 |"
    assert lines[3] == "| 1 | 0.1 | (unreadable metrics.json: killed while writing?) |  |  |"
    assert capsys.readouterr().out.splitlines() == lines


def test_toy_bench_redoes_what_a_truncated_marker_or_metrics_file_says_is_done(tmp_path):
    from tdd_lightning.toy.bench import read_json

    (tmp_path / "marker.json").write_text('{"args": ["--n", "10')
    (tmp_path / "list.json").write_text("[1, 2]")
    assert read_json(tmp_path / "marker.json") == {} and read_json(tmp_path / "list.json") == {}
    assert read_json(tmp_path / "missing.json") == {}
    (tmp_path / "ok.json").write_text('{"minutes": 2.5}')
    assert read_json(tmp_path / "ok.json") == {"minutes": 2.5}


@pytest.mark.parametrize("killed_in", ["results.json", "grid.png"])
def test_a_kill_while_the_eval_report_is_written_leaves_the_previous_files(tmp_path, monkeypatch, killed_in):
    from PIL import Image

    from tdd_lightning.toy import runner

    grid = runner.Grid([1], [0.0], [1.0], [0], teacher_steps=[1])
    records = [{"model": "TDD", "run": 0, "steps": 1, "eta": 0.0, "guidance": 1.0, "seed": 0,
                "prompt_acc": 0.5, "fd": 10.0, "agree": 1.0}]  # fmt: skip
    meta = {"n": 2, "ref_steps": 1, "ref_guidance": 2.0}
    columns = {"TDD 1 st.": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}
    runner.write_report(tmp_path, records, {}, grid, columns, ["a", "b"], meta)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"results.json", "table.md", "grid.png"} <= set(before)

    def killed_writing(path) -> None:
        if killed_in in str(path):
            Path.write_bytes(Path(path), b"half")  # what a kill mid-write leaves in the file being written
            raise KeyboardInterrupt

    write_text, save = Path.write_text, Image.Image.save

    def save_png(image, fp, *args, **kwargs):
        killed_writing(fp)
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", lambda p, *a, **k: killed_writing(p) or write_text(p, *a, **k))
    monkeypatch.setattr(Image.Image, "save", save_png)
    records[0]["prompt_acc"] = 0.75
    columns["TDD 1 st."] = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    with pytest.raises(KeyboardInterrupt):
        runner.write_report(tmp_path, records, {}, grid, columns, ["a", "b"], meta)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after[killed_in] == before[killed_in]  # the previous file, whole
    assert after["table.md"] != before["table.md"]  # written (whole) before the kill
    assert sorted(after) == sorted(before)  # and no temp file left behind
