"""Run an evaluation grid (teacher + students) on a toy :class:`~tdd_lightning.toy.suite.Suite` and
write its report: table.md, results.json, quality plots and a sample grid."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tdd_lightning.checkpoint_io import atomic_write
from tdd_lightning.pipelines import Setting
from tdd_lightning.toy.sampling import trailing_timesteps
from tdd_lightning.toy.suite import student_timesteps

TEACHER = "teacher DDIM"  # the UNet toy teacher's rows (a flow teacher's: Suite.teacher_name)
GRID_PROMPTS = 8  # rows of the sample grid: the first prompts of the suite


@dataclass
class Student:
    name: str  # the group (method) it is aggregated under
    path: Path  # the LoRA file
    run: int  # index within its group (training seed order)
    seeds: list[int] = field(default_factory=list)


@dataclass
class Grid:
    steps: list[int]
    etas: list[float]
    guidances: list[float]
    seeds: list[int]
    guidance_steps: list[int] | None = None  # guidances past the first: only these step counts
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 25, 50])
    teacher_guidance: float = 3.0

    def student_settings(self, seeds: Sequence[int]):
        for seed in seeds:
            for g_i, g in enumerate(self.guidances):
                for eta in self.etas:
                    for k in self.steps:
                        # guidances past the first: at the first eta (and guidance_steps) only
                        if g_i > 0 and (eta != self.etas[0] or k not in (self.guidance_steps or [k])):
                            continue
                        yield Setting(k, eta, g, seed)

    def teacher_settings(self):
        for seed in self.seeds:
            for k in sorted(self.teacher_steps, reverse=True):  # the reference (most steps) first
                yield Setting(k, 0.0, self.teacher_guidance, seed)


def run_grid(
    suite,
    students: Sequence[Student],
    grid: Grid,
    load: Callable[[Student], tuple],
    log: Callable[[str], None] = print,
    grid_steps: int = 4,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Every cell of ``grid`` for the teacher and each student: (records, grid images by column title)."""

    records, columns = [], {}
    for s in grid.teacher_settings():
        res, images = suite.teacher_cell(s)
        records.append({"model": suite.teacher_name, "run": 0, **asdict(s)} | res)
        log(_line(suite.teacher_name, s, res))
        if s.seed == grid.seeds[0] and s.steps in (grid_steps, max(grid.teacher_steps)):
            if images is None:  # a cached cell: sample just the grid's prompts
                images = suite.images(suite.unet, trailing_timesteps(s.steps), s, count=GRID_PROMPTS)
            columns[f"teacher {s.steps} st."] = images[:GRID_PROMPTS]
    for st in students:
        unet, scheduler = load(st)
        timesteps = student_timesteps(scheduler)
        clip_x0 = getattr(scheduler, "clip_x0", None)  # its configured x0 clipping (off by default)
        for s in grid.student_settings(st.seeds):
            res, images = suite.cell(unet, timesteps, s, clip_x0=clip_x0)
            records.append({"model": st.name, "run": st.run, **asdict(s)} | res)
            log(_line(f"{st.name}#{st.run}", s, res))
            first = s.eta == grid.etas[0] and s.guidance == grid.guidances[0] and s.seed == st.seeds[0]
            if st.run == 0 and first and s.steps == grid_steps:
                columns[f"{st.name} {s.steps} st."] = images[:GRID_PROMPTS]
    return records, columns


def _line(name: str, s, res: dict) -> str:
    return (
        f"{name:>14} k={s.steps} eta={s.eta:g} g={s.guidance:g} seed={s.seed}: prompt acc "
        f"{res['prompt_acc']:.3f} FD {res['fd']:.1f} agree {res['agree']:.2f} ({res.get('seconds', 0):.0f} s)"
    )


def write_report(
    out: Path, records: list[dict], reals: dict, grid: Grid, columns: dict, captions: list[str], meta: dict
) -> dict[str, Path]:
    """table.md, results.json, plots and the sample grid into ``out`` (each written atomically: a kill
    leaves the previous file or the new one, never half of one); returns the written paths."""
    from tdd_lightning.plotting import label_grid
    from tdd_lightning.toy.report import aggregate, markdown_table, plot_vs

    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    real_rows = [
        {"model": k, "steps": "-", "eta": 0.0, "guidance": 0.0, "n": 1} | v for k, v in reals.items()
    ]
    table = markdown_table(rows + [r | {"agree": float("nan")} for r in real_rows])
    header = (
        f"n = {meta['n']} prompts per cell; spread = std over seeds and training runs (n cells); "
        f"agree = mean evaluator-feature distance to the teacher's {meta['ref_steps']}-step CFG "
        f"{meta['ref_guidance']:g} image from the same noise (0 = identical)."
    )
    paths = {"table": out / "table.md", "results": out / "results.json"}
    results = json.dumps({"meta": meta, "records": records, "real": reals}, indent=1)
    atomic_write(paths["table"], lambda tmp: tmp.write_text(header + "\n\n" + table + "\n"))
    atomic_write(paths["results"], lambda tmp: tmp.write_text(results))
    teachers = {r["model"] for r in rows if r["model"].startswith("teacher ")}
    students = sorted({r["model"] for r in rows} - teachers)
    first_eta, first_g = grid.etas[0], grid.guidances[0]
    fixed = {m: {"eta": first_eta, "guidance": first_g} for m in students}
    fixed |= {t: {"eta": 0.0, "guidance": grid.teacher_guidance} for t in teachers}
    p = plot_vs(
        rows, "steps", fixed, out / "quality_vs_steps.png", f"students at eta {first_eta:g}, CFG {first_g:g}"
    )
    if p:
        paths["steps_plot"] = p
    if len(grid.guidances) > 1:
        k = (grid.guidance_steps or grid.steps)[0]
        fixed = {m: {"eta": first_eta, "steps": k} for m in students}
        p = plot_vs(
            rows,
            "guidance",
            fixed,
            out / "quality_vs_guidance.png",
            f"students at {k} steps, eta {first_eta:g}",
        )
        if p:
            paths["guidance_plot"] = p
    if columns:
        cols = list(columns.values())
        grid_img = label_grid(
            [c.float() / 255 for c in cols], list(columns), captions[: len(cols[0])], cell=96
        )
        atomic_write(out / "grid.png", lambda tmp: grid_img.save(tmp, format="PNG"))
        paths["grid"] = out / "grid.png"
    return paths
