"""Tabulate a Hydra multirun's final metrics: `python -m tdd_lightning.training.sweep_report <multirun dir>`.

Each job folder holds .hydra/overrides.yaml and the metrics.json that `train.py` writes at the end.
Prints a markdown table (one row per job: the swept overrides, then the chosen metrics) and writes it to
``<multirun dir>/report.md`` (atomically). A job whose metrics.json is missing, truncated or not JSON (a job
killed while writing it) gets a row saying so, and the other jobs are still reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from tdd_lightning.checkpoint_io import atomic_write

DEFAULT_METRICS = ("train/loss", "train/samples_per_s", "global_step")


UNREADABLE = "(unreadable metrics.json: killed while writing?)"


def read_metrics(path: Path) -> dict | str | None:
    """A job's metrics: the dict, None when there is no file yet, UNREADABLE when it does not parse."""
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return UNREADABLE
    return metrics if isinstance(metrics, dict) else UNREADABLE


def read_overrides(path: Path) -> dict[str, str]:
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    return dict(o.split("=", 1) for o in overrides if isinstance(o, str) and "=" in o)


def collect(multirun_dir: Path) -> list[dict]:
    rows = []
    for job in sorted(p.parent.parent for p in multirun_dir.glob("*/.hydra/overrides.yaml")):
        overrides = read_overrides(job / ".hydra" / "overrides.yaml")
        rows.append({"job": job.name, "overrides": overrides, "metrics": read_metrics(job / "metrics.json")})
    return rows


def to_markdown(rows: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    # only the overrides that differ between jobs are columns
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    head = ["job", *swept, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["overrides"].get(k, "") for k in swept]
        if not isinstance(r["metrics"], dict):
            note = r["metrics"] or "(no metrics: failed or running)"
            values += [note] + [""] * (len(metrics) - 1)
        else:
            values += [_fmt(r["metrics"].get(m)) for m in metrics]
        lines.append("| " + " | ".join([r["job"].split("_", 1)[0], *values]) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.5g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("multirun_dir", type=Path)
    p.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS),
        help="metric names to show, e.g. eval/prompt_acc/4steps_eta0.2 (toy_tdd's end-of-run evaluation)",
    )  # fmt: skip
    a = p.parse_args(argv)
    rows = collect(a.multirun_dir)
    if not rows:
        print(f"error: no Hydra jobs (*/.hydra/overrides.yaml) under {a.multirun_dir}", file=sys.stderr)
        return 1
    table = to_markdown(rows, tuple(a.metrics))
    print(table)
    atomic_write(a.multirun_dir / "report.md", lambda tmp: tmp.write_text(table + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
