"""Evaluate distilled students next to their teacher on the toy shapes task: table, plots, grids.

    python -m tdd_lightning.toy.eval --student TDD=logs/toy_tdd/runs/<time> --student LCM=<exported LoRA> \\
        --steps 1 2 4 6 8 --eta 0 0.2 --guidance 1 2 --seeds 0 1 --out logs/eval [--wandb]

A student is ``NAME=PATH``: an exported LoRA (file or folder, ``python -m tdd_lightning.export``) or a
training run folder (its ``checkpoints/last_lora/<role>``). Repeat a NAME for several training seeds of
one method: they are aggregated (mean ± spread). Every student is sampled the same way: its exported
scheduler's K-step schedule (the grid it was trained on), ``tdd_sample`` with each eta, standard CFG
against the teacher family's negative (``--uncond``; zeros for the UNet toy teacher) with each guidance,
from the same initial noise per sampling seed. The teacher runs DDIM with trailing spacing
(``--teacher-steps``, ``--teacher-guidance``, eta 0). ``--teacher models/toy-flow-teacher`` evaluates
students of the flow toy teacher (FLUX family): the same prompts and metrics; there "DDIM" at eta 0 is
the Euler sampler of FluxPipeline's schedule. ``--scheduler KEY=VALUE`` changes the students' exported
scheduler config for this evaluation (the ablations of make bench-toy: ``schedule=equidistant``, x0 clipping
with ``clip_sample=true clip_sample_range=R clip_steps=T_L``).

Writes ``<out>/table.md``, ``results.json`` (every cell), ``quality_vs_steps.png``,
``quality_vs_guidance.png`` (when several guidances) and ``grid.png``; logs them to wandb with ``--wandb``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from tdd_lightning.errors import UserError
from tdd_lightning.export import ROLES
from tdd_lightning.strategies.guidance import UNCOND_CONVENTIONS
from tdd_lightning.toy.runner import Grid, Student, run_grid, write_report


def resolve_student(spec: str, role: str = "student") -> tuple[str, Path]:
    """``NAME=PATH`` -> (name, LoRA file); a run folder resolves to its last exported LoRA."""
    from tdd_lightning.pipelines import resolve_lora_file

    name, sep, raw = spec.partition("=")
    parts = spec.split("=")
    for i in range(2, len(parts)):  # names and paths may both hold "=": split where the path exists
        if Path("=".join(parts[i:])).expanduser().exists():
            name, raw = "=".join(parts[:i]), "=".join(parts[i:])
            break
    if not sep or not name or not raw:
        raise UserError(f"--student {spec!r}: write NAME=PATH (e.g. TDD=logs/toy_tdd/runs/<time>)")
    path = Path(raw).expanduser()
    if (path / "checkpoints" / "last_lora").is_dir():
        path = path / "checkpoints" / "last_lora" / role
    try:
        return name, resolve_lora_file(path)
    except FileNotFoundError as e:
        raise UserError(f"--student {name}: {e}") from None


def group_students(specs: Sequence[str], seeds: Sequence[int], paired: bool, role: str) -> list[Student]:
    """Number each group's members; ``paired``: member i samples only with seeds[i % len(seeds)]."""
    students, count = [], {}
    for spec in specs:
        name, path = resolve_student(spec, role)
        i = count.get(name, 0)
        count[name] = i + 1
        mine = [seeds[i % len(seeds)]] if paired else list(seeds)
        students.append(Student(name, path, i, mine))
    return students


def scheduler_overrides(specs: Sequence[str]) -> dict:
    """``KEY=VALUE`` specs -> {key: value}, each value read as YAML (true, 2.5, null, equidistant)."""
    import yaml

    out = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--scheduler {spec!r}: write KEY=VALUE (e.g. schedule=equidistant)")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def with_config(scheduler, overrides: dict):
    """``scheduler`` rebuilt with ``overrides`` on its config; a key it does not have, or a value it
    refuses, is an error (diffusers alone would drop an unknown key with a warning)."""
    if not overrides:
        return scheduler
    unknown = sorted(set(overrides) - set(scheduler.config))
    if unknown:
        keys = ", ".join(k for k in scheduler.config if not k.startswith("_"))
        name = type(scheduler).__name__
        raise UserError(f"--scheduler {', '.join(unknown)}: not in {name}'s config ({keys})")
    try:
        return type(scheduler).from_config(scheduler.config, **overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"--scheduler: {e}") from None


def load_student_unet(teacher: str, lora: Path, device: str = "cpu", scheduler_config: dict | None = None):
    """The teacher's denoiser (a UNet, or a flow teacher's transformer) with the LoRA merged in (bare-model
    speed) and its exported TDDScheduler (TDDFlowScheduler), with ``scheduler_config`` on its config."""
    from tdd_lightning.pipelines import load_tdd_pipeline

    pipe = load_tdd_pipeline(teacher, lora, fuse=True, device=device)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    return denoiser.eval(), with_config(pipe.scheduler, scheduler_config or {})


def log_wandb(paths: dict[str, Path], records: list[dict], project: str, name: str | None, out: Path) -> None:
    import wandb

    run = wandb.init(project=project, name=name, job_type="eval", dir=str(out))  # <out>/wandb, not ./wandb
    rows = [{k: v for k, v in r.items() if isinstance(v, int | float | str)} for r in records]
    columns = sorted({k for r in rows for k in r})
    run.log({"eval/cells": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
    run.log({f"eval/{k}": wandb.Image(str(v)) for k, v in paths.items() if v.suffix == ".png"})
    run.finish()


def build_suite(a):
    from tdd_lightning.models.loading import ModelNotFoundError
    from tdd_lightning.toy.suite import Suite

    if not Path(a.data, "heldout").is_dir():
        raise UserError(f"--data {a.data}: no held-out split there (run `make shapes`)")
    try:
        return Suite.from_teacher(
            a.teacher, a.evaluator, a.data, n=a.n, ref_steps=a.ref_steps, ref_guidance=a.teacher_guidance,
            cache_dir=a.cache_dir, device=a.device, progress=not a.no_progress, uncond=a.uncond,
        )  # fmt: skip
    except ModelNotFoundError as e:
        raise UserError(f"--teacher: {e}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    p.add_argument(
        "--role", default="student", choices=list(ROLES), help="for run folders (ema: the evaluation EMA)"
    )
    p.add_argument(
        "--teacher", default="models/toy-teacher", help="UNet toy teacher, or models/toy-flow-teacher (FLUX)"
    )
    p.add_argument(
        "--uncond",
        choices=list(UNCOND_CONVENTIONS),
        default=None,
        help="CFG's negative (default: the teacher family's: zeros for the UNet toy, \"\" for the flow toy)",
    )
    p.add_argument("--evaluator", default="models/toy-evaluator")
    p.add_argument("--data", default="data/shapes/two", help="shapes dataset root (its heldout split)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    p.add_argument("--eta", type=float, nargs="+", default=[0.2])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    p.add_argument(
        "--guidance-steps",
        type=int,
        nargs="+",
        default=None,
        help="evaluate guidances past the first only at these step counts",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (initial noise)")
    p.add_argument(
        "--paired-seeds",
        action="store_true",
        help="the i-th student of a name samples with seeds[i] only (the teacher with all)",
    )
    p.add_argument(
        "--scheduler",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="students' scheduler config here (repeatable): schedule=equidistant, clip_steps=1",
    )
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 25, 50])
    p.add_argument("--teacher-guidance", type=float, default=3.0, help="teacher CFG (also for its reference)")
    p.add_argument("--ref-steps", type=int, default=50, help="teacher steps of the agreement reference")
    p.add_argument("--n", type=int, default=1000, help="prompts per cell (<= half the held-out split)")
    p.add_argument("--out", default="logs/eval")
    p.add_argument("--cache-dir", default="artifacts/toy-eval-cache", help="teacher cells ('' to disable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, ... (initial noise is drawn on the CPU)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr) while sampling")
    p.add_argument("--wandb", action="store_true", help="log table, plots and grid to wandb")
    p.add_argument("--wandb-project", default="tdd_lightning")
    p.add_argument("--name", default=None, help="wandb run name")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    from diffusers.utils import logging as dlogging

    a = parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dlogging.set_verbosity_error()
    start = time.time()
    grid = Grid(a.steps, a.eta, a.guidance, a.seeds, a.guidance_steps, a.teacher_steps, a.teacher_guidance)
    students = group_students(a.student, a.seeds, a.paired_seeds, a.role)
    overrides = scheduler_overrides(a.scheduler)
    suite = build_suite(a)
    records, columns = run_grid(
        suite, students, grid, lambda st: load_student_unet(a.teacher, st.path, a.device, overrides)
    )
    meta = {
        "n": a.n,
        "ref_steps": a.ref_steps,
        "ref_guidance": a.teacher_guidance,
        "scheduler": overrides,
        "args": vars(a),
        "students": [asdict(s) | {"path": str(s.path)} for s in students],
    }
    paths = write_report(Path(a.out), records, suite.real_rows(), grid, columns, suite.captions, meta)
    print(paths["table"].read_text())
    if a.wandb:
        log_wandb(paths, records, a.wandb_project, a.name, Path(a.out))
    print(f"wrote {a.out} ({time.time() - start:.0f} s)")
    return records


def cli() -> int:
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
