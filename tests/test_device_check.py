"""The prepared GPU check (tdd_lightning.bench.device_check): its figures, its part runner, and the CPU
rehearsal end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdd_lightning.bench import device_check as dc

ROOT = Path(__file__).resolve().parents[1]


def test_toy_figures_separate_epoch_first_steps_from_the_steady_ones():
    secs = [5.0, 0.5, 0.1, 2.0, 0.1, 0.1, 3.0, 0.1, 0.1]  # epochs of 3 steps; 2.0 and 3.0 start epochs 1, 2
    steps = [{"s": s, "epoch": i // 3, "finite": True} for i, s in enumerate(secs)]
    f = dc.toy_figures(steps, batch=8, per_epoch=3)
    assert f["epochs"] == 3 and f["steps"] == 9 and f["first_step_s"] == 5.0
    assert f["epoch_first_steps_s"] == [2.0, 3.0]
    assert f["step_median_ms"] == pytest.approx(100.0) and f["samples_per_s"] == pytest.approx(80.0)
    assert f["epoch_stall_s"] == pytest.approx(2.9) and f["finite"]


def test_bench_matrix_is_batch_by_checkpointing_by_compile_uncompiled_first():
    runs = dc.bench_runs(gpu=True)
    assert len(runs) == 8 and {(r["batch"], r["gc"], r["compile"]) for r in runs} == {
        (b, g, c) for b in (4, 8) for g in (True, False) for c in (True, False)
    }
    assert [r["compile"] for r in runs] == [False] * 4 + [True] * 4
    assert runs[0] == {"batch": 4, "gc": True, "compile": False}  # the 40 GB memory target first


def test_part_runner_records_each_outcome_and_stops_a_slow_child(tmp_path, monkeypatch):
    c = dc.Check("cpu", tmp_path, tmp_path / "wheels", tmp_path / "site", env=dict(__import__("os").environ))

    def slow(check):
        check.run("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"])

    def broken(check):
        raise dc.PartFailed("it broke", {"x": 1})

    monkeypatch.setitem(dc.PARTS, "slow", slow)
    monkeypatch.setitem(dc.PARTS, "broken", broken)
    t0 = time.monotonic()
    timed_out = dc.run_part(c, "slow", budget=2)
    assert timed_out["status"] == "timeout" and time.monotonic() - t0 < 15
    assert "stopped after" in (tmp_path / "logs" / "sleeper.log").read_text()
    assert dc.run_part(c, "broken", 5) | {"seconds": 0} == {
        "budget_s": 5, "status": "failed", "reason": "it broke", "figures": {"x": 1}, "seconds": 0
    }  # fmt: skip
    skipped = dc.run_part(c, "install", 5)  # no wheels folder here
    assert skipped["status"] == "skipped" and "make device-wheels" in skipped["reason"]


@pytest.mark.slow
def test_cpu_rehearsal_writes_a_summary_with_every_part(tmp_path):
    out = tmp_path / "dc"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "tdd_lightning.bench.device_check", "--device", "cpu", "--out", str(out),
         "--bundle", str(tmp_path / "dc.tar.gz")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    print(f"rehearsal {elapsed:.0f} s:", {k: (v["status"], v["seconds"]) for k, v in parts.items()})
    assert list(parts) == ["install", "gpu_tests", "bench", "toy"]
    assert all(v["status"] in dc.STATUSES and "seconds" in v for v in parts.values())
    assert parts["gpu_tests"]["status"] == "skipped" and parts["gpu_tests"]["figures"]["skipped"] >= 6
    assert parts["bench"]["status"] == "ok" and parts["toy"]["status"] == "ok", r.stdout[-3000:]
    runs = parts["bench"]["figures"]["runs"]
    assert sum(v["status"] == "ok" for v in runs.values()) == 4 and all(
        v["samples_per_s"] > 0 for v in runs.values() if v["status"] == "ok"
    )
    toy = parts["toy"]["figures"]["runs"]["persistent_workers"]
    assert toy["finite"] and toy["epochs"] >= 2 and toy["samples_per_s"] > 0
    assert r.returncode == 0 and (tmp_path / "dc.tar.gz").stat().st_size > 0
