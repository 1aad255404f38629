"""The paper's ablations on the toy (make bench-toy): training knobs as Hydra multirun sweeps, sampler
options as evaluations of the benchmark's TDD students, one table each with the spread over seeds.

Training sweeps (``SWEEPS``): ``python train.py -m experiment=toy_tdd <knob>=<value> seed=<seeds>`` into
``<runs>/ablations/<name>/<knob value>_seed<seed>``, then ``training.sweep_report`` of the folder (its
``report.md``) and one ``toy.eval`` of every job (students named by their value, training seed i sampled
with seed i). A finished job (its metrics.json reads) is not trained again; an interrupted one resumes
(``ckpt_path=auto``). Sampler ablations (``SAMPLERS``): the same trained students evaluated with other
``--scheduler`` settings. Evaluation, prompts and n are the benchmark's for every variant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tdd_lightning.checkpoint_io import atomic_write
from tdd_lightning.toy.report import aggregate, cell_text, find_row

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "toy_tdd"  # the ablations' budget: the make-train recipe (one job ~9 min on 2 cores)


@dataclass(frozen=True)
class Sweep:
    """A training ablation: ``knob`` over ``values`` (the recipe's own value among them), x seeds."""

    name: str
    title: str
    knob: str
    values: tuple[str, ...]
    eval_args: tuple[str, ...]  # the cells: toy.eval's --steps/--eta/--guidance


@dataclass(frozen=True)
class Sampler:
    """An evaluation-only ablation: the benchmark's TDD students with each variant's scheduler settings."""

    name: str
    title: str
    variants: dict[str, tuple[str, ...]]  # label -> toy.eval --scheduler KEY=VALUE
    eval_args: tuple[str, ...]


STEPS = ("--steps", "4", "8")
SWEEPS = (
    Sweep(
        "s_ratio",
        "gamma offset s_ratio, sampled at eta 0 and 0.2 (does the offset help gamma sampling?)",
        "target_selection.s_ratio",
        ("0.0", "0.15", "0.3"),
        (*STEPS, "--eta", "0", "0.2"),
    ),
    Sweep(
        "p_empty",
        "caption dropout p_empty x inference CFG (decoupled guidance), eta 0.2",
        "guidance.p_empty",
        ("0.0", "0.1", "0.2"),
        (*STEPS, "--eta", "0.2", "--guidance", "1", "1.5", "2"),
    ),
    Sweep(
        "window",
        "target window W (candidates in [m* - W, m*])",
        "target_selection.window",
        ("0", "130", "260"),
        (*STEPS, "--eta", "0", "0.2"),
    ),
)
CLIP = ("clip_sample=true", "clip_sample_range=2.5")  # the toy latents: std 1.0, |x| 99.9th percentile 2.3
SAMPLERS = (
    Sampler(
        "schedule",
        "K = 5, 6, 7: the non-equidistant schedules against the equidistant ones",
        {"non-equidistant": ("schedule=nonequidistant",), "equidistant": ("schedule=equidistant",)},
        ("--steps", "5", "6", "7", "--eta", "0", "0.2"),
    ),
    Sampler(
        "clipping",
        "x0 clipping (clamp to +-2.5) on the first t_l steps only",
        {"off": (), "t_l = 1": (*CLIP, "clip_steps=1"), "t_l = 2": (*CLIP, "clip_steps=2")},
        (*STEPS, "--eta", "0", "0.2"),
    ),
)
NAMES = tuple(a.name for a in SWEEPS + SAMPLERS)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; {} when it is missing, truncated or not an object (then: redo)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def evaluate_once(eval_args: list[str], out: Path) -> float:
    """``toy.eval`` with ``eval_args`` into ``out`` unless the same evaluation finished there before;
    returns its minutes."""
    done = out / "bench_eval_args.json"
    previous = read_json(done)  # a half-written or corrupt marker means: evaluate again
    if previous.get("args") == eval_args and read_json(out / "results.json").get("records"):
        print(f"[bench] evaluation done before ({out})", flush=True)
        return previous.get("minutes", 0.0)
    print("[bench] python -m tdd_lightning.toy.eval " + " ".join(eval_args), flush=True)
    from tdd_lightning.toy import eval as toy_eval

    start = time.time()
    toy_eval.main(eval_args)
    minutes = (time.time() - start) / 60
    marker = json.dumps({"args": eval_args, "minutes": minutes})
    atomic_write(done, lambda tmp: tmp.write_text(marker))
    return minutes


def job_dir(sweep_dir: Path, value: str, seed: int) -> Path:
    return sweep_dir / f"{value}_seed{seed}"


def train_sweep(sw: Sweep, seeds: Sequence[int], runs: Path, extra: Sequence[str] = ()) -> list[Path]:
    """The sweep's jobs (value-major, seeds in order), training the missing ones as Hydra multiruns."""
    sweep_dir = runs / "ablations" / sw.name
    for value in sw.values:
        todo = [s for s in seeds if not read_json(job_dir(sweep_dir, value, s) / "metrics.json")]
        if not todo:
            print(f"[bench] ablation {sw.name}={value}: done before", flush=True)
            continue
        cmd = [
            sys.executable, str(ROOT / "train.py"), "-m", f"experiment={EXPERIMENT}",
            f"{sw.knob}={value}", "seed=" + ",".join(map(str, todo)), "ckpt_path=auto",
            "~callbacks.toy_eval", "~callbacks.toy_curves", "callbacks.progress_bar.refresh_rate=100",
            f"hydra.sweep.dir={sweep_dir}", f"hydra.sweep.subdir={value}_seed${{seed}}", *extra,
        ]  # fmt: skip
        print(f"[bench] ablation {sw.name}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    report = [sys.executable, "-m", "tdd_lightning.training.sweep_report", str(sweep_dir)]
    subprocess.run([*report, "--metrics", "train/loss", "global_step"], check=True, cwd=ROOT)
    return [job_dir(sweep_dir, v, s) for v in sw.values for s in seeds]


def cells(eval_args: Sequence[str]) -> list[tuple[int, float, float]]:
    """(steps, eta, guidance) of each table column, in the order the evaluation runs them: ``eval_args``
    read by toy.eval's own parser (its defaults), the cells from its ``Grid``."""
    from tdd_lightning.toy.eval import parser
    from tdd_lightning.toy.runner import Grid

    a, _ = parser().parse_known_args(list(eval_args))
    grid = Grid(a.steps, a.eta, a.guidance, [0], a.guidance_steps)
    return [(s.steps, s.eta, s.guidance) for s in grid.student_settings([0])]


def table(rows: list[dict], labels: Sequence[str], eval_args: Sequence[str], label_name: str) -> str:
    """Markdown: one row per variant, one column per cell, 'prompt acc ± std / FD ± std' over the seeds."""
    cols = cells(eval_args)

    def head(c):
        return f"{c[0]} st. eta {c[1]:g}" + ("" if c[2] == 1.0 else f" CFG {c[2]:g}")

    lines = [f"| {label_name} | " + " | ".join(head(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in labels:
        out = []
        for k, eta, g in cols:
            r = find_row(rows, label, k, eta, g)
            out.append(
                "n/a"
                if r is None
                else f"{cell_text(r, 'prompt_acc', '{:.3f}')} / {cell_text(r, 'fd', '{:.1f}')}"
            )
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def rows_of(eval_dir: Path, model: str | None = None, label: str | None = None) -> list[dict]:
    """The aggregated rows of an evaluation (of one ``model``, relabelled ``label``; default all)."""
    rows = aggregate(json.loads((eval_dir / "results.json").read_text())["records"])
    if model is not None:
        rows = [r | {"model": label or model} for r in rows if r["model"] == model]
    return rows


def eval_args(students: list[str], seeds: Sequence[int], cells_args: Sequence[str], *rest: str) -> list[str]:
    """toy.eval arguments: the students (training seed i sampled with seed i) and the ablation's cells."""
    return [*students, "--paired-seeds", "--seeds", *map(str, seeds), *cells_args, *rest]


def sweep_section(
    sw: Sweep,
    seeds: Sequence[int],
    runs: Path,
    eval_root: Path,
    common: Sequence[str],
    extra: Sequence[str] = (),
) -> str:
    jobs = train_sweep(sw, seeds, runs, extra)
    values = [v for v in sw.values for _ in seeds]
    students = [a for v, job in zip(values, jobs, strict=True) for a in ("--student", f"{v}={job}")]
    out = eval_root / f"ablation_{sw.name}"
    evaluate_once(eval_args(students, seeds, sw.eval_args, *common, "--out", str(out)), out)
    seed_list = ",".join(map(str, seeds))
    return (
        f"### {sw.title}\n\n`python train.py -m experiment={EXPERIMENT} {sw.knob}={','.join(sw.values)} "
        f"seed={seed_list}` (one job per value and seed; the sweep report: `{runs.name}/ablations/{sw.name}/"
        f"report.md`). Students at inference CFG 1 unless a column says; prompt acc / FD, mean ± std over "
        f"training seeds {seed_list} (each sampled with its own seed).\n\n"
        + table(rows_of(out), sw.values, sw.eval_args, sw.knob)
    )


def sampler_section(
    sa: Sampler, seeds: Sequence[int], tdd_runs: Sequence[Path], eval_root: Path, common
) -> str:
    students = [a for job in tdd_runs for a in ("--student", f"TDD={job}")]
    rows = []
    for label, settings in sa.variants.items():
        out = eval_root / f"ablation_{sa.name}" / label.replace(" ", "")
        sched = [f"--scheduler={s}" for s in settings]
        evaluate_once(eval_args(students, seeds, sa.eval_args, *sched, *common, "--out", str(out)), out)
        rows += rows_of(out, "TDD", label)
    settings = "; ".join(f"{k}: `{' '.join(v) or 'as exported'}`" for k, v in sa.variants.items())
    return (
        f"### {sa.title}\n\nThe benchmark's TDD students (training seeds {', '.join(map(str, seeds))}) with "
        f"the scheduler settings of `toy.eval --scheduler`: {settings}. Prompt acc / FD, mean ± std over the "
        "seeds.\n\n" + table(rows, list(sa.variants), sa.eval_args, "sampler")
    )


def run(
    names: Sequence[str],
    seeds: Sequence[int],
    runs: Path,
    eval_root: Path,
    common_eval: Sequence[str],
    tdd_runs: Sequence[Path] = (),
    extra_train: Sequence[str] = (),
) -> list[str]:
    """Train and evaluate the ablations in ``names``; their markdown sections. ``tdd_runs``: the
    benchmark's TDD runs (one per seed) that the sampler ablations evaluate; ``extra_train``: overrides
    for every training job."""
    sections = [
        sweep_section(sw, seeds, runs, eval_root, common_eval, extra_train)
        for sw in SWEEPS
        if sw.name in names
    ]
    for sa in SAMPLERS:
        if sa.name in names:
            if not tdd_runs:
                raise ValueError(
                    f"the {sa.name} ablation evaluates the benchmark's TDD students (--methods TDD)"
                )
            sections.append(sampler_section(sa, seeds, tdd_runs, eval_root, common_eval))
    return sections
