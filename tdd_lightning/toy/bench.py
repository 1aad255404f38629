"""The toy benchmark (make bench-toy): TDD, LCM, TCD and PCM students of one teacher, same budget, then
one evaluation of all of them next to the teacher, and the paper's ablations (``toy.ablations``), written
to docs/results/toy.md.

    python -m tdd_lightning.toy.bench --seeds 0 1 --runs logs/bench_toy --out docs/results/toy.md

Each student is ``python train.py experiment=toy_tdd_long`` (``--experiment``) with one override set
(below) and ``seed=S``; only
the target selection (or, for the guidance study, ``guidance.p_empty``) differs, so steps, batch, lr,
LoRA rank, teacher guidance and dropout are the same for every method. Finished runs (their
``metrics.json`` reads) are reused, so an interrupted benchmark resumes where it stopped. The
evaluation is ``python -m tdd_lightning.toy.eval`` with ``--paired-seeds``: training seed i samples with
sampling seed i; the teacher samples with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tdd_lightning.checkpoint_io import atomic_write
from tdd_lightning.toy import ablations
from tdd_lightning.toy.ablations import evaluate_once, read_json
from tdd_lightning.toy.report import cell_text, find_row

ROOT = Path(__file__).resolve().parents[2]

# name -> train.py overrides on top of the experiment (--experiment)
METHODS = {
    "TDD": ["target_selection=tdd"],
    "LCM": ["target_selection=lcm"],
    "TCD": ["target_selection=tcd"],
    "PCM": ["target_selection=pcm"],
}  # p_empty (decoupled guidance) is studied by the p_empty ablation (toy.ablations)


def train_student(
    name: str, overrides: list[str], seed: int, runs: Path, extra: list[str], experiment: str = "toy_tdd_long"
) -> Path:
    run = runs / f"{name.replace(' ', '_').replace('=', '')}_seed{seed}"
    if read_json(run / "metrics.json"):  # finished (a truncated metrics.json: resume and finish again)
        print(f"[bench] {name} seed {seed}: done before ({run})", flush=True)
        return run
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"experiment={experiment}",
        *overrides,
        f"seed={seed}",
        f"hydra.run.dir={run}",
        "~callbacks.toy_eval",  # evaluated below, every method identically, from the exported LoRAs
        "~callbacks.toy_curves",
        "callbacks.progress_bar.refresh_rate=100",
        *extra,
    ]
    if (run / "checkpoints" / "last.ckpt").is_file():
        cmd.append("ckpt_path=auto")  # interrupted: resume
    print(f"[bench] {name} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[bench] {name} seed {seed}: trained in {time.time() - t0:.0f} s", flush=True)
    return run


def train_minutes(run: Path) -> float:
    """Wall time of a finished run: from its composed config to its metrics.json."""
    return ((run / "metrics.json").stat().st_mtime - (run / ".hydra" / "config.yaml").stat().st_mtime) / 60


def budget(run: Path) -> str:
    """The shared training budget, read from a run's resolved config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    return (
        f"{cfg.trainer.max_steps} steps, batch {cfg.data.batch_size}, lr {cfg.optimizer.lr:g} "
        f"({OmegaConf.select(cfg, 'lr_scheduler.lr_lambda.shape', default='constant')}), LoRA rank "
        f"{cfg.model.lora.rank}, teacher CFG {1 + cfg.guidance.w:g}, p_empty {cfg.guidance.p_empty:g}, "
        f"EMA target {cfg.module.ema_decay:g}"
    )


def _fmt(r: dict | None, m: str) -> str:
    """``0.601 ± 0.004`` (a spread over runs), ``0.642`` (one cell: no spread), ``n/a`` (no row)."""
    if r is None:
        return "n/a"
    return cell_text(r, m, "{:.3f}" if m == "prompt_acc" else "{:.1f}")


def targets(rows: list[dict], eta: float, teacher: str = "teacher DDIM", teacher_g: float = 3.0) -> str:
    """The issue's targets, checked on the aggregated rows (students at ``eta``, CFG 1)."""
    t50, t4, t8 = (find_row(rows, teacher, k, 0.0, teacher_g) for k in (50, 4, 8))
    out = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    tdd4 = find_row(rows, "TDD", 4, eta, 1.0)
    if tdd4 and t50 and t4:
        acc_ratio, fd_ratio = tdd4["prompt_acc"] / t50["prompt_acc"], tdd4["fd"] / t50["fd"]
        out.append(
            f"- TDD at 4 steps vs teacher at 50: prompt acc {_fmt(tdd4, 'prompt_acc')} = {acc_ratio:.2f}x "
            f"the teacher's {_fmt(t50, 'prompt_acc')} (target >= 0.95x: {verdict(acc_ratio >= 0.95)}); "
            f"FD {_fmt(tdd4, 'fd')} = {fd_ratio:.2f}x the teacher's {_fmt(t50, 'fd')} "
            f"(target <= 1.1x: {verdict(fd_ratio <= 1.1)})."
        )
        better = tdd4["prompt_acc"] > t4["prompt_acc"] and tdd4["fd"] < t4["fd"]
        out.append(
            f"- TDD at 4 steps vs the teacher's own 4-step DDIM ({_fmt(t4, 'prompt_acc')}, FD "
            f"{_fmt(t4, 'fd')}): better on both {verdict(better)}."
        )
    tdd8 = find_row(rows, "TDD", 8, eta, 1.0)
    if tdd8 and t8:
        ok = tdd8["prompt_acc"] >= t8["prompt_acc"] and tdd8["fd"] <= t8["fd"]
        out.append(
            f"- TDD at 8 steps vs the teacher's own 8-step DDIM: prompt acc {_fmt(tdd8, 'prompt_acc')} vs "
            f"{_fmt(t8, 'prompt_acc')}, FD {_fmt(tdd8, 'fd')} vs {_fmt(t8, 'fd')} (target: at least as good "
            f"on both: {verdict(ok)})."
        )
    for k in (4, 8):
        tdd = find_row(rows, "TDD", k, eta, 1.0)
        for other in ("LCM", "TCD", "PCM"):
            o = find_row(rows, other, k, eta, 1.0)
            if tdd is None or o is None:
                continue
            ok = tdd["prompt_acc"] > o["prompt_acc"] and tdd["fd"] < o["fd"]
            out.append(
                f"- {k} steps, TDD vs {other}: prompt acc {_fmt(tdd, 'prompt_acc')} vs "
                f"{_fmt(o, 'prompt_acc')}, "
                f"FD {_fmt(tdd, 'fd')} vs {_fmt(o, 'fd')}: TDD better on both {verdict(ok)}."
            )
    for k in (4, 8):  # decoupled guidance (p_empty 0.2): inference CFG should help; p_empty 0: the ablation
        g1, g2 = find_row(rows, "TDD", k, eta, 1.0), find_row(rows, "TDD", k, eta, 2.0)
        if g1 is None or g2 is None:
            continue
        improves = g2["prompt_acc"] > g1["prompt_acc"]  # judged on prompt accuracy; FD shown
        out.append(
            f"- TDD (p_empty 0.2), {k} steps, inference CFG 1 -> 2: prompt acc "
            f"{_fmt(g1, 'prompt_acc')} -> {_fmt(g2, 'prompt_acc')}, FD {_fmt(g1, 'fd')} -> {_fmt(g2, 'fd')} "
            f"(expected: improves; {verdict(improves)})."
        )
    return "\n".join(out)


def page(table: str, meta: dict, plots: list[str]) -> str:
    """The markdown page: how it was made, the table and the plots (analysis is appended by hand)."""
    lines = [
        "# Toy benchmark: TDD, LCM, TCD and PCM distilled from the toy teacher",
        "",
        f"Made by `make bench-toy` (`python -m tdd_lightning.toy.bench {' '.join(meta['argv'])}`) on "
        f"{meta['machine']}: {len(meta['train_minutes'])} students trained in "
        f"{sum(meta['train_minutes']):.0f} min ({min(meta['train_minutes']):.1f} to "
        f"{max(meta['train_minutes']):.1f} min each), evaluated in {meta['eval_minutes']:.0f} min. "
        f"Students: `experiment={meta['experiment']}` "
        f"({meta['budget']}), training seeds {meta['seeds']}; only the target selection differs. The teacher "
        "rows are at CFG 3, the issue's fixed reference.",
        "",
    ]
    lines += [
        "## Targets (students at inference CFG 1 unless said; mean ± std over the 2 runs)",
        "",
        meta["targets"],
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## All cells", "", table]
    if meta.get("ablations"):
        lines += ["", "## Ablations (the paper's, on the toy)", "", *(s + "\n" for s in meta["ablations"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--experiment", default="toy_tdd_long", help="the students' recipe (conf/experiment)")
    p.add_argument(
        "--ablations", nargs="*", default=list(ablations.NAMES), choices=list(ablations.NAMES),
        help="the ablations to run (none: --ablations with no name)",
    )  # fmt: skip
    p.add_argument("--runs", default="logs/bench_toy", help="one run folder per student")
    p.add_argument("--out", default="docs/results/toy.md")
    p.add_argument("--eval-out", default=None, help="tables, plots, grid (default: beside --out)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--train-override", action="append", default=[], help="extra train.py override (all runs)")
    p.add_argument("--eval-arg", action="append", default=[], help="extra eval argument (e.g. --threads=2)")
    a = p.parse_args(argv)
    start = time.time()
    runs = ROOT / a.runs
    students, train_min = [], []
    for name in a.methods:
        for seed in a.seeds:
            run = train_student(name, METHODS[name], seed, runs, a.train_override, a.experiment)
            students += ["--student", f"{name}={run}"]
            train_min.append(train_minutes(run))
    out = ROOT / a.out
    eval_dir = Path(a.eval_out) if a.eval_out else out.parent / out.stem
    eval_args = [
        *students, "--paired-seeds", "--seeds", *map(str, a.seeds), "--n", str(a.n),
        "--steps", "1", "2", "4", "8", "--eta", "0.2", "0", "1",
        "--guidance", "1", "1.5", "2", "--guidance-steps", "4", "8",
        "--teacher-steps", "1", "2", "4", "8", "25", "50", "--out", str(eval_dir), *a.eval_arg,
    ]  # fmt: skip
    eval_minutes = evaluate_once(eval_args, eval_dir)
    tdd_runs = [runs / f"TDD_seed{seed}" for seed in a.seeds] if "TDD" in a.methods else []
    common_eval = ["--n", str(a.n), "--teacher-steps", "50", *a.eval_arg]
    sections = ablations.run(a.ablations, a.seeds, runs, eval_dir, common_eval, tdd_runs, a.train_override)
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "experiment": a.experiment,
        "ablations": sections,
        "train_minutes": train_min,
        "eval_minutes": eval_minutes,
        "machine": f"{os.cpu_count()} CPU cores",
        "seeds": a.seeds,
        "budget": budget(runs / f"TDD_seed{a.seeds[0]}") if "TDD" in a.methods else "see toy_tdd.yaml",
    }
    from tdd_lightning.toy.report import aggregate

    records = json.loads((eval_dir / "results.json").read_text())["records"]
    rows = aggregate(records)
    meta["targets"] = "\n\n".join(
        f"Students at eta {eta:g}{note}:\n\n" + targets(rows, eta)
        for eta, note in ((0.2, " (TDD's recommended eta)"), (0.0, " (deterministic)"))
    )
    table = (eval_dir / "table.md").read_text()
    plots = [f"{eval_dir.name}/{f}" for f in ("quality_vs_steps.png", "quality_vs_guidance.png", "grid.png")
             if (eval_dir / f).is_file()]  # fmt: skip
    findings = ""  # a hand-written analysis survives re-runs
    if out.is_file() and "\n## Findings" in out.read_text():
        findings = "\n## Findings" + out.read_text().split("\n## Findings", 1)[1]
    text = page(table, meta, plots) + findings
    atomic_write(out, lambda tmp: tmp.write_text(text))  # never half a page: the findings are hand-written
    print(f"[bench] wrote {out} ({(time.time() - start) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
