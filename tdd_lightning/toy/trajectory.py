"""Where along the trajectory is a student wrong? Its one-jump error against the teacher's own multi-step
solution, per start time t (issue 13's defect check).

    python -m tdd_lightning.toy.trajectory --student TDD=logs/toy_tdd/runs/<time> [--student ...] \\
        --grid 50 --guidance 3 --n 256 --out logs/trajectory

The teacher (DDIM on the training grid of ``--grid`` steps, CFG ``--guidance`` against the zeros
condition, eta 0) runs from the same x_T for the first n held-out prompts and keeps every grid point x_t*
and its end x0*. From each x_t* on that trajectory each student (CFG 1, as the toy evaluates it) makes one
DDIM jump

- to s = 0: its x0 against the teacher's x0* (the consistency-to-the-end error), and
- to s = the next point of the K-step schedule below t (``--k``, default 4): its x_s against the
  teacher's own x_s* (the error a K-step sampler pays at that step; below the schedule's last point the
  sampler's x0 against x0*),

each as a mean squared error per latent element, averaged over the n samples, divided by the variance of
x0* (so 1.0 is the error of predicting the mean). The teacher's own one-step x0 (its prediction at x_t*,
no ODE) is the reference that distillation must beat. Writes ``<out>/trajectory.csv`` and
``trajectory_error.png``; prints the table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from tdd_lightning.diffusion import ddim_jump, k_step_schedule, teacher_grid, to_eps_x0
from tdd_lightning.errors import UserError
from tdd_lightning.progress import progress_bar
from tdd_lightning.toy.data import load_split
from tdd_lightning.toy.sampling import encode_prompts, initial_noise


def model_fn(unet, cond: dict[str, torch.Tensor], guidance: float):
    """x, t -> the model's output with standard CFG against the zeros condition (g = 1: conditional)."""
    from tdd_lightning.models.families.sdxl import SDXL

    u = SDXL.unconditional_like(cond, None)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return SDXL.denoise(unet, x, t, cond)
        out_c, out_u = SDXL.cfg_outputs(unet, x, t, cond, u, same=None)
        return out_u + guidance * (out_c - out_u)

    return fn


def jump(fn, x: torch.Tensor, t: int, s: int, schedule, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_s, x0) of one DDIM jump t -> s with the model ``fn`` (s = -1 or 0 with x0: the end)."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    a_t, sigma_t = schedule.a_sigma(tt, x)
    eps, x0 = to_eps_x0(fn(x, tt).float(), x, a_t, sigma_t, kind)
    a_s, sigma_s = schedule.a_sigma(torch.full_like(tt, max(s, 0)), x)
    return ddim_jump(x, eps, a_t, sigma_t, a_s, sigma_s, x0=x0), x0


@torch.no_grad()
def teacher_trajectory(fn, x_T: torch.Tensor, grid: list[int], schedule, kind: str, progress: bool):
    """{t: x_t*} on the descending grid (from x_T at grid[0]) and the end x0* (the last grid point's x0)."""
    points, x = {}, x_T
    with progress_bar(total=len(grid), desc="teacher trajectory", unit="step", enabled=progress) as bar:
        for i, t in enumerate(grid):
            points[t] = x
            s = grid[i + 1] if i + 1 < len(grid) else 0
            x_next, x0 = jump(fn, x, t, s, schedule, kind)
            x = x_next if i + 1 < len(grid) else x0
            bar.update(1)
    return points, x


def next_point(schedule_k: list[int], t: int) -> int:
    """The largest point of the K-step schedule below t, or 0."""
    below = [p for p in schedule_k if p < t]
    return max(below) if below else 0


@torch.no_grad()
def errors(
    fns: dict[str, object], points: dict[int, torch.Tensor], x0_star: torch.Tensor, schedule, kind: str,
    schedule_k: list[int], progress: bool,
) -> list[dict]:  # fmt: skip
    """One row per start time t: the normalised errors of every model's jump to 0 and to the next point."""
    var = x0_star.var().item()
    rows = []
    with progress_bar(total=len(points) * len(fns), desc="jumps", unit="jump", enabled=progress) as bar:
        for t, x_t in points.items():
            s = next_point(schedule_k, t)
            target_s = points.get(s, x0_star) if s > 0 else x0_star
            row = {"t": t, "s_next": s}
            for name, fn in fns.items():
                x_s, x0 = jump(fn, x_t, t, s, schedule, kind)
                row[f"{name}/x0"] = ((x0 - x0_star) ** 2).mean().item() / var
                x_s = x_s if s > 0 else x0  # below the last K-step point a sampler returns x0
                row[f"{name}/next"] = ((x_s - target_s) ** 2).mean().item() / var
                bar.update(1)
            rows.append(row)
    return rows


def plot(rows: list[dict], names: list[str], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ts = [r["t"] for r in rows]
    for ax, key, label in (
        (axes[0], "x0", "one jump to s = 0 vs the teacher's x0*"),
        (axes[1], "next", "one jump to the next K-step point vs the teacher's x_s*"),
    ):
        for name in names:
            ax.plot(ts, [r[f"{name}/{key}"] for r in rows], marker=".", label=name)
        ax.set_xlabel("start time t (on the teacher's trajectory)")
        ax.set_ylabel("MSE / var(x0*)")
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "trajectory_error.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def table(rows: list[dict], names: list[str]) -> str:
    head = "| t | s (next) | " + " | ".join(f"{n}: to 0 / to next" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in rows:
        cells = " | ".join(f"{r[f'{n}/x0']:.4f} / {r[f'{n}/next']:.4f}" for n in names)
        lines.append(f"| {r['t']} | {r['s_next']} | {cells} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", action="append", default=[], help="NAME=PATH (run folder or LoRA)")
    p.add_argument("--role", default="student", help="the LoRA role of a run folder (student, target, ema)")
    p.add_argument("--teacher", default="models/toy-teacher")
    p.add_argument("--data", default="data/shapes/two")
    p.add_argument("--grid", type=int, default=50, help="the teacher grid N (the student's training grid)")
    p.add_argument("--k", type=int, default=4, help="the K-step schedule whose next point is the target")
    p.add_argument("--guidance", type=float, default=3.0, help="the teacher's CFG scale")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=1, help="keep every k-th grid point as a start time")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tdd_lightning.diffusion import NoiseSchedule
    from tdd_lightning.models import load_sdxl_components
    from tdd_lightning.toy.eval import load_student_unet, resolve_student

    a = parse_args(argv)
    if not a.student:
        raise UserError("give at least one --student NAME=PATH")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    components = load_sdxl_components(a.teacher)
    schedule = NoiseSchedule.from_config(components.noise_scheduler.config)
    kind = components.noise_scheduler.config.get("prediction_type", "epsilon")
    _, attrs = load_split(a.data, "heldout", limit=a.n)
    cond = encode_prompts(components, [r["caption"] for r in attrs])
    x_T = initial_noise(len(attrs), a.seed)
    grid = teacher_grid(a.grid, schedule.num_train_timesteps)[::-1]
    teacher = model_fn(components.unet.eval(), cond, a.guidance)
    points, x0_star = teacher_trajectory(teacher, x_T, grid, schedule, kind, progress=True)
    points = {t: x for i, (t, x) in enumerate(points.items()) if i % a.every == 0}
    fns = {f"teacher (1 step, CFG {a.guidance:g})": teacher}
    for spec in a.student:
        name, lora = resolve_student(spec, a.role)
        unet, _ = load_student_unet(a.teacher, lora)
        fns[name] = model_fn(unet, cond, 1.0)
    schedule_k = k_step_schedule(a.k, a.grid, schedule.num_train_timesteps)
    rows = errors(fns, points, x0_star, schedule, kind, schedule_k, progress=True)
    names = list(fns)
    write_csv(rows, out / "trajectory.csv")
    title = f"toy: one-jump error along the teacher's trajectory (grid {a.grid}, n {len(attrs)}, K {a.k})"
    png = plot(rows, names, out, title)
    print(table(rows, names))
    print(f"wrote {out / 'trajectory.csv'} and {png}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        sys.exit(f"error: {e}")
