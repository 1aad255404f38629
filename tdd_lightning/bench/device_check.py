"""``python -m tdd_lightning.bench.device_check``: the prepared GPU check (issue 19), as ONE command.

    python -m tdd_lightning.bench.device_check                 # on a lent GPU (<= 8 min on an H100/H200)
    python -m tdd_lightning.bench.device_check --device cpu    # the CPU rehearsal: tiny sizes, seconds a part
    make device-check [DEVICE=cpu]

Parts, each in its own time budget and its own processes (a failure or a timeout moves on to the next):
  install    the carried wheels (``make device-wheels`` -> .device-wheels/) into a target folder with
             ``pip install --no-index --no-deps --target``, then on PYTHONPATH (CPU: a dry install only);
  gpu_tests  ``pytest -m gpu tests/test_gpu.py`` (they skip without CUDA);
  bench      ``python -m tdd_lightning.bench`` over batch x gradient checkpointing x compile
             (GPU: sdxl_arch, 1024 px, bf16; CPU: the tiny model, small latents, no compile);
  toy        the toy distillation at a GPU-sized batch for a fixed number of steps with persistent
             DataLoader workers (then the default loader if time is left): it/s, samples/s and the
             first step of each epoch.
Everything goes under ``$DEVICE_CHECK_OUT`` (default logs/device-check/): one log per process and
``summary.json`` (each part: status ok | failed | skipped | timeout, seconds, figures), rewritten after
each part; ``--bundle FILE`` (or ``$DEVICE_CHECK_BUNDLE``) also packs the folder into FILE.tar.gz after
each part (a device's $OUT returns few files). Only the standard library is imported here: the parts
need the installed wheels, this file does not.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATUSES = ("ok", "failed", "skipped", "timeout")

# seconds per part: GPU sum 480 (8 minutes); the CPU rehearsal is seconds a part on a free machine,
# with room for a busy one
BUDGETS = {
    "cuda": {"install": 45, "gpu_tests": 150, "bench": 205, "toy": 80},
    "cpu": {"install": 60, "gpu_tests": 120, "bench": 150, "toy": 150},
}
# the toy's reference batch and learning rate (conf/data/toy_teacher.yaml, conf/experiment/toy_tdd.yaml)
TOY_BATCH, TOY_LR = 64, 3.0e-4


class PartTimeout(Exception):
    """A part's time budget ran out (a child process was stopped)."""


class PartFailed(Exception):
    """A part that ran and failed, with the figures it has."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures or {}


class Skip(PartFailed):
    """A part that cannot run here (the message says why), with the figures it has."""


@dataclass
class Check:
    """What the parts share: the device, the output folder, the environment of the child processes."""

    device: str  # "cuda" or "cpu"
    out: Path
    wheels: Path
    site: Path
    env: dict[str, str] = field(default_factory=dict)
    deadline: float = float("inf")  # the running part's

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cap: float | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the repository root, stdout+stderr to ``<out>/logs/<name>.log``, within the part's
        budget (and ``cap`` seconds); a timeout stops the whole process group and raises PartTimeout."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        limit = min(self.left(), cap or float("inf"))
        if limit <= 1:
            raise PartTimeout(f"no time left for {name}")
        with log.open("w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            p = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                f.write(f"\n[device_check] stopped after {limit:.0f} s\n")
                raise PartTimeout(f"{name} ran past {limit:.0f} s (log: logs/{name}.log)") from None
        return subprocess.CompletedProcess(cmd, rc, log.read_text(errors="replace"), "")


def tail(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# ---------------------------------------------------------------- a. install
def part_install(c: Check) -> dict:
    wheels = sorted(glob.glob(str(c.wheels / "*.whl")))
    if not wheels:
        raise Skip(f"no wheels in {c.wheels} (run `make device-wheels` on a machine with PyPI, carry it)")
    site = c.site if c.gpu else Path(tempfile.mkdtemp(prefix="tdd-dry-site-"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    r = c.run("install", [*pip, "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], cap=120)
    if r.returncode != 0:
        raise RuntimeError(f"pip install failed: {tail(r.stdout)}")
    installed = sorted(p.name for p in site.glob("*.dist-info"))
    if c.gpu:  # the later parts import from here first
        c.env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), c.env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    probe = "import json, importlib.metadata as m; import torch; print(json.dumps({'versions': {n: m.version(n) for n in %r}, 'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"  # noqa: E501
    names = [
        "torch", "lightning", "transformers", "peft", "diffusers", "hydra-core", "omegaconf",
        "webdataset", "braceexpand", "safetensors", "accelerate", "huggingface-hub",
    ]  # fmt: skip
    env_site = {**c.env, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    v = subprocess.run(
        [sys.executable, "-c", probe % names], cwd=ROOT, env=env_site, capture_output=True, text=True
    )
    figures = {"target": str(site), "wheels": [Path(w).name for w in wheels], "installed": installed}
    if v.returncode == 0:
        figures |= json.loads(v.stdout.strip().splitlines()[-1])
    else:
        raise RuntimeError(f"the installed packages do not import: {tail(v.stderr)}")
    if not c.gpu:
        figures["note"] = "dry install into a temporary folder; this machine's own packages are used"
    return figures


# ---------------------------------------------------------------- b. gpu tests
def part_gpu_tests(c: Check) -> dict:
    import xml.etree.ElementTree as ET

    xml = c.out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu"]
    r = c.run("gpu_tests", [*cmd, f"--junitxml={xml}", "tests/test_gpu.py"])
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report (rc {r.returncode}): {tail(r.stdout)}")
    tests, counts = {}, {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            tests[name] = "failed: " + (bad.get("message") or "")[:200]
            counts["failed"] += 1
        elif skip is not None:
            tests[name] = "skipped: " + (skip.get("message") or "")[:200]
            counts["skipped"] += 1
        else:
            tests[name] = f"passed ({float(case.get('time', 0)):.1f} s)"
            counts["passed"] += 1
    figures = counts | {"tests": tests, "rc": r.returncode}
    if r.returncode != 0 or counts["failed"]:
        raise PartFailed(f"{counts['failed']} of {len(tests)} GPU tests failed", figures)
    if not counts["passed"]:
        raise Skip(f"all {counts['skipped']} GPU tests skipped cleanly (no CUDA)", figures)
    return figures


# ---------------------------------------------------------------- c. bench
def bench_runs(gpu: bool) -> list[dict]:
    """The benchmark matrix in priority order (the budget may end it early): GPU batch 4 and 8 at 1024 px
    with and without gradient checkpointing, without compile first; CPU the same at tiny sizes."""
    batches = (4, 8) if gpu else (2, 4)
    order = [(batches[0], True), (batches[1], False), (batches[0], False), (batches[1], True)]
    runs = [{"batch": b, "gc": gc, "compile": False} for b, gc in order]
    runs += [{"batch": b, "gc": gc, "compile": True} for b, gc in order]
    return runs


def bench_command(c: Check, run: dict, json_path: Path, first: bool) -> list[str]:
    base = [sys.executable, "-m", "tdd_lightning.bench", "--batch", str(run["batch"])]
    base += ["--gradient-checkpointing", str(run["gc"]).lower(), "--json", str(json_path)]
    if run["compile"]:
        base.append("--compile")
    if c.gpu:
        base += ["--model", "sdxl_arch", "--device", "cuda", "--precision", "bf16", "--sample-size", "128"]
        base += ["--warmup", "4" if run["compile"] else "2", "--steps", "5", "--budget-s", "60"]
        base += ["--naive-steps", "2" if first else "0"] + (["--sync-debug"] if first else [])
    else:
        base += ["--model", "tiny", "--device", "cpu", "--precision", "fp32", "--sample-size", "8"]
        base += ["--warmup", "1", "--steps", "2", "--budget-s", "20", "--naive-steps", "1" if first else "0"]
    return base


def bench_figures(r: dict) -> dict:
    """The figures of one benchmark JSON that the summary keeps."""
    fl, naive = r.get("flops") or {}, r.get("naive") or {}
    return {
        "step_ms": 1e3 * r["step_s"],
        "samples_per_s": r["samples_per_s"],
        "cuda_peak_gib": r.get("cuda_peak_gib"),
        "peak_rss_mib": r.get("peak_rss_mib"),
        "mfu": fl.get("mfu"),
        "achieved_tflops": fl.get("achieved_tflops"),
        "peak_tflops": fl.get("peak_tflops"),
        "step_tflop": fl["step"] / 1e12 if "step" in fl else None,
        "phases_ms": {k: 1e3 * v for k, v in r["phases_mean_s"].items()},
        "overhead_ratio": r.get("overhead_ratio"),
        "naive_samples_per_s": naive.get("samples_per_s"),
        "naive_ratio": r.get("naive_ratio"),
        "host_syncs": None if r.get("host_syncs") is None else len(r["host_syncs"]),
        "machine": r.get("machine"),
        "wall_s": r.get("wall_s"),
    }


def part_bench(c: Check) -> dict:
    runs, results = bench_runs(c.gpu), {}
    (c.out / "bench").mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs):
        name = f"b{run['batch']}_gc{int(run['gc'])}_compile{int(run['compile'])}"
        if run["compile"] and not c.gpu:
            results[name] = {"status": "skipped", "reason": "torch.compile takes minutes on a CPU: GPU only"}
            continue
        if c.left() < (60 if c.gpu else 5):
            results[name] = {"status": "skipped", "reason": "the part's budget is spent"}
            continue
        json_path = c.out / "bench" / f"{name}.json"
        t0 = time.monotonic()
        try:
            cmd = bench_command(c, run, json_path, first=i == 0)
            r = c.run(f"bench_{name}", cmd, cap=180 if c.gpu else 60)
        except PartTimeout as e:
            results[name] = {"status": "timeout", "reason": str(e), "seconds": time.monotonic() - t0}
            continue
        entry = {"seconds": round(time.monotonic() - t0, 1)}
        if r.returncode == 0 and json_path.exists():
            entry |= {"status": "ok", **bench_figures(json.loads(json_path.read_text()))}
        else:
            entry |= {"status": "failed", "reason": tail(r.stdout, 3)}
        results[name] = entry
    ok = {k: v for k, v in results.items() if v["status"] == "ok"}
    figures = {"runs": results}
    if not ok:
        raise PartFailed("no benchmark run finished", figures)
    best = max(ok, key=lambda k: (ok[k]["mfu"] or 0, ok[k]["samples_per_s"]))
    figures["best"] = {"run": best, "mfu": ok[best]["mfu"], "samples_per_s": ok[best]["samples_per_s"]}
    gc4 = ok.get(f"b{bench_runs(c.gpu)[0]['batch']}_gc1_compile0")
    if gc4:
        figures["peak_gib_batch4_gc"] = gc4["cuda_peak_gib"]
    return figures


# ---------------------------------------------------------------- d. toy
def toy_data(c: Check) -> tuple[str, str]:
    """(shard pattern, where it came from): the toy cache if built (`make toy-data`), else a small one
    built here from freshly drawn shapes with the toy teacher's VAE and text encoders."""
    cache = ROOT / "data" / "cache" / "toy-teacher" / "train"
    if (cache / "meta.json").exists():
        return str(cache / "shard-*.tar"), f"the toy cache {cache.relative_to(ROOT)}"
    work = c.out / "toy-data"
    n, shards = (4096, 8) if c.gpu else (256, 2)
    r = c.run(
        "toy_shapes",
        [sys.executable, "data/make_shapes.py", "--out", str(work / "shapes"), "--difficulty", "two",
         "--train", str(n), "--heldout", "64", "--shards", str(shards)],
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"make_shapes failed: {tail(r.stdout)}")
    r = c.run(
        "toy_encode",
        [sys.executable, "-m", "tdd_lightning.data.encode", str(work / "shapes" / "train" / "shard-*.tar"),
         str(work / "cache"), "--model", "models/toy-teacher", "--resolution", "32", "--batch-size", "512",
         "--num-workers", "4" if c.gpu else "1", "--device", c.device, "--overwrite", "--no-progress"],
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"encode failed: {tail(r.stdout)}")
    return str(work / "cache" / "shard-*.tar"), f"{n} two-object shapes drawn and encoded for this check"


def toy_figures(steps: list[dict], batch: int, per_epoch: int) -> dict:
    """it/s and samples/s of the steady steps (not the first two, nor the first of an epoch), and the first
    step of each epoch after the first against the steady median (the DataLoader stall)."""
    first = [i for i, s in enumerate(steps) if i == 0 or s["epoch"] != steps[i - 1]["epoch"]]
    steady = [s["s"] for i, s in enumerate(steps) if i >= 2 and i not in first]
    med = statistics.median(steady) if steady else float("nan")
    later = [steps[i]["s"] for i in first[1:]]
    return {
        "steps": len(steps),
        "epochs": len(first),
        "steps_per_epoch": per_epoch,
        "it_per_s": 1 / med if steady else None,
        "samples_per_s": batch / med if steady else None,
        "step_median_ms": 1e3 * med if steady else None,
        "first_step_s": steps[0]["s"] if steps else None,
        "epoch_first_steps_s": [round(x, 3) for x in later],
        "epoch_stall_s": max(later) - med if later and steady else None,
        "finite": all(s["finite"] is not False for s in steps),
    }


def part_toy(c: Check) -> dict:
    shards, source = toy_data(c)
    batch = 512 if c.gpu else 16
    workers = 4 if c.gpu else 1
    per_epoch_steps, max_steps = (4, 40) if c.gpu else (3, 7)
    lr = TOY_LR * (batch / TOY_BATCH) ** 0.5
    figures = {
        "data": source,
        "batch": batch,
        "lr": lr,
        "lr_rule": f"sqrt scaling from the toy's {TOY_LR} at batch {TOY_BATCH} (throughput run)",
        "num_workers": workers,
        "runs": {},
    }
    for variant, persistent in (("persistent_workers", True), ("default_loader", False)):
        if c.left() < (25 if c.gpu else 10):
            figures["runs"][variant] = {"status": "skipped", "reason": "the part's budget is spent"}
            continue
        run_dir = c.out / "toy" / variant
        times = run_dir / "step_times.json"
        overrides = [
            "experiment=toy_tdd", f"trainer={'gpu' if c.gpu else 'cpu'}", f"data.train_shards={shards}",
            f"data.batch_size={batch}", f"data.num_workers={workers}",
            f"data.persistent_workers={str(persistent).lower()}", "data.resampled=true",
            f"data.samples_per_epoch={batch * per_epoch_steps}",
            f"data.shuffle_buffer={min(1000, 4 * batch)}", f"data.pin_memory={str(c.gpu).lower()}",
            f"optimizer.lr={lr:.3g}", f"trainer.max_steps={max_steps}", "trainer.log_every_n_steps=5",
            "+trainer.enable_checkpointing=false", "+trainer.enable_progress_bar=false",
            "callbacks=none", "+callbacks.step_times._target_=tdd_lightning.bench.step_times.StepTimes",
            f"+callbacks.step_times.path={times}", "logger=csv", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        t0 = time.monotonic()
        try:
            r = c.run(f"toy_{variant}", [sys.executable, "train.py", *overrides], cap=70 if c.gpu else 120)
        except PartTimeout as e:
            figures["runs"][variant] = {"status": "timeout", "reason": str(e)}
            continue
        entry = {"seconds": round(time.monotonic() - t0, 1)}
        if r.returncode == 0 and times.exists():
            steps = json.loads(times.read_text())["steps"]
            entry |= {"status": "ok", **toy_figures(steps, batch, per_epoch_steps)}
        else:
            entry |= {"status": "failed", "reason": tail(r.stdout, 3)}
        figures["runs"][variant] = entry
    if figures["runs"].get("persistent_workers", {}).get("status") != "ok":
        raise PartFailed("the toy run with persistent workers did not finish", figures)
    return figures


PARTS: dict[str, Callable[[Check], dict]] = {
    "install": part_install,
    "gpu_tests": part_gpu_tests,
    "bench": part_bench,
    "toy": part_toy,
}


# ---------------------------------------------------------------- the check
def run_part(c: Check, name: str, budget: float) -> dict:
    """One part in its budget: {status, seconds, budget_s, figures | reason}; never raises."""
    t0 = time.monotonic()
    c.deadline = t0 + budget
    entry: dict = {"budget_s": budget}
    try:
        entry |= {"status": "ok", "figures": PARTS[name](c)}
    except Skip as e:
        entry |= {"status": "skipped", "reason": str(e), "figures": e.figures}
    except PartTimeout as e:
        entry |= {"status": "timeout", "reason": str(e)}
    except PartFailed as e:
        entry |= {"status": "failed", "reason": str(e), "figures": e.figures}
    except Exception as e:  # noqa: BLE001 - one part's bug must not cost the others
        entry |= {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    entry["seconds"] = round(time.monotonic() - t0, 1)
    return entry


def write_summary(out: Path, summary: dict, bundle: Path | None) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(out / "summary.json")
    if bundle is not None:
        part = bundle.with_name(bundle.name + ".part")
        with tarfile.open(part, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        part.replace(bundle)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tdd_lightning.bench.device_check", description=__doc__)
    p.add_argument("--device", choices=("cuda", "cpu"), default=os.environ.get("DEVICE", "cuda"))
    p.add_argument("--out", default=os.environ.get("DEVICE_CHECK_OUT", "logs/device-check"))
    p.add_argument("--wheels", default=os.environ.get("DEVICE_WHEELS", ".device-wheels"))
    p.add_argument("--site", default=os.environ.get("DEVICE_SITE", "/tmp/tdd-device-site"))
    p.add_argument("--bundle", default=os.environ.get("DEVICE_CHECK_BUNDLE"), help="also pack into it")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--scale", type=float, default=1.0, help="multiply every part's time budget")
    a = p.parse_args(argv)
    out = Path(a.out) if Path(a.out).is_absolute() else ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env |= {"TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    c = Check(a.device, out, ROOT / a.wheels, Path(a.site), env)
    bundle = Path(a.bundle) if a.bundle else None
    started = time.monotonic()
    summary = {
        "device": a.device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "host": platform.node(),
        "budgets_s": {k: BUDGETS[a.device][k] * a.scale for k in a.parts},
        "parts": {},
    }
    for name in PARTS:
        if name not in a.parts:
            summary["parts"][name] = {"status": "skipped", "reason": "not asked for (--parts)", "seconds": 0}
            continue
        print(f"[device_check] {name} (budget {BUDGETS[a.device][name] * a.scale:.0f} s) ...", flush=True)
        entry = run_part(c, name, BUDGETS[a.device][name] * a.scale)
        summary["parts"][name] = entry
        summary["total_s"] = round(time.monotonic() - started, 1)
        print(f"[device_check] {name}: {entry['status']} in {entry['seconds']} s "
              f"{entry.get('reason', '')}", flush=True)  # fmt: skip
        write_summary(out, summary, bundle)
    print(f"[device_check] summary: {out / 'summary.json'} ({summary['total_s']} s)", flush=True)
    return 0 if all(v["status"] in ("ok", "skipped") for v in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
