"""Evaluation records -> a markdown table (mean ± spread over seeds) and PNG plots.

A record is one evaluated cell: ``{"model", "steps", "eta", "guidance", "seed", "run", <metrics>}``.
``model`` is the group (e.g. "TDD", "teacher"); cells of a group that differ only in ``seed`` or
``run`` (training seed) are aggregated: mean and sample standard deviation (``±``), with the count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from tdd_lightning.checkpoint_io import atomic_write

METRICS = (("prompt_acc", "prompt acc", "{:.3f}"), ("fd", "FD", "{:.1f}"), ("agree", "agree", "{:.2f}"))
KEY = ("model", "steps", "eta", "guidance")


def aggregate(records: Iterable[dict]) -> list[dict]:
    """One row per (model, steps, eta, guidance), in first-seen order: mean, std and n per metric."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in KEY)].append(r)
    rows = []
    for key, members in groups.items():
        row = dict(zip(KEY, key, strict=True)) | {"n": len(members)}
        for m in {k for r in members for k in r if isinstance(r[k], float)} - set(KEY):
            vals = [float(r[m]) for r in members if m in r]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else float("nan")
            row[m], row[f"{m}_std"] = mean, math.sqrt(var)
        rows.append(row)
    return rows


def find_row(rows: Sequence[dict], model: str, steps: int, eta: float, guidance: float) -> dict | None:
    """The aggregated row of one cell (``KEY``), or None when it was not evaluated."""
    return next((r for r in rows if tuple(r[k] for k in KEY) == (model, steps, eta, guidance)), None)


def cell_text(row: dict, metric: str, fmt: str) -> str:
    if metric not in row or math.isnan(row[metric]):
        return "-"
    text = fmt.format(row[metric])
    std = row.get(f"{metric}_std", float("nan"))
    return text if math.isnan(std) else f"{text} ± {fmt.format(std)}"


def markdown_table(rows: Sequence[dict], extra: Sequence[str] = ()) -> str:
    """``| model | steps | eta | guidance | n | prompt acc | FD | agree | extra... |``."""
    metrics = list(METRICS) + [(m, m.removeprefix("acc_"), "{:.3f}") for m in extra]
    head = ["model", "steps", "eta", "CFG", "n"] + [title for _, title, _ in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sampled = r["steps"] != "-"
        eta, cfg = (f"{r['eta']:g}", f"{r['guidance']:g}") if sampled else ("-", "-")
        cells = [str(r["model"]), str(r["steps"]), eta, cfg, str(r["n"])]
        cells += [cell_text(r, m, fmt) for m, _, fmt in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _select(rows, model, **fixed):
    return [r for r in rows if r["model"] == model and all(r[k] == v for k, v in fixed.items())]


def plot_vs(rows: Sequence[dict], x: str, fixed: dict[str, dict], out: str | Path, title: str) -> Path | None:
    """Prompt accuracy and FD against ``x`` ("steps" or "guidance"), one line per model.

    ``fixed`` maps each model to the settings its line holds fixed (e.g. {"eta": 0.2, "guidance": 1}).
    Error bars are the spread over seeds. Returns None when no model has two points on the axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for model, keep in fixed.items():
        pts = sorted(_select(rows, model, **keep), key=lambda r: r[x])
        if len(pts) >= 2:
            lines[model] = pts
    if not lines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (metric, label, _) in zip(axes, METRICS[:2], strict=False):
        for model, pts in lines.items():
            xs = [r[x] for r in pts]
            ys = [r[metric] for r in pts]
            err = [
                0.0 if math.isnan(r.get(f"{metric}_std", float("nan"))) else r[f"{metric}_std"] for r in pts
            ]
            style = "--" if model.startswith("teacher") else "-"
            ax.errorbar(xs, ys, yerr=err, fmt=style + "o", ms=4, capsize=3, label=model)
        ax.set_xlabel("sampling steps" if x == "steps" else "inference guidance (CFG)")
        ax.set_ylabel(label)
        if x == "steps":
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r[x] for pts in lines.values() for r in pts}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        _finish_axis(ax, metric)
    return _save_figure(fig, axes, title, out, legend_size=8)


def _finish_axis(ax, metric: str) -> None:
    if metric == "fd":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _save_figure(fig, axes, title: str, out: str | Path, legend_size: int) -> Path:
    """Legend, title, layout, then an atomic PNG write; the figure is closed."""
    import matplotlib.pyplot as plt

    axes[0].legend(fontsize=legend_size)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def plot_curves(history: Sequence[dict], out: str | Path, title: str) -> Path | None:
    """Prompt accuracy, FD and agreement against the training step, one line per role and cell.

    ``history``: rows ``{"step": ..., "eval/prompt_acc/4steps_eta0": ..., "eval_ema/...": ...}`` (the
    curves callback's). The EMA's lines are dashed in the colour of the student's same cell. Returns None
    with fewer than two rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(history) < 2:
        return None
    keys = sorted({k for r in history for k in r} - {"step"})
    cells = sorted({k.split("/", 2)[2] for k in keys}, key=lambda c: (int(c.split("steps")[0]), c))
    colours = {c: f"C{i}" for i, c in enumerate(cells)}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(14, 3.8))
    for ax, (metric, label, _) in zip(axes, METRICS, strict=True):
        for key in (k for k in keys if k.split("/")[1] == metric):
            prefix, _, cell = key.split("/", 2)
            pts = [(r["step"], r[key]) for r in history if key in r]
            role = "student" if prefix == "eval" else prefix.removeprefix("eval_")
            style = "-o" if role == "student" else "--s"
            ax.plot(*zip(*pts, strict=True), style, ms=3, color=colours[cell], label=f"{role} {cell}")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        _finish_axis(ax, metric)
    return _save_figure(fig, axes, title, out, legend_size=7)
