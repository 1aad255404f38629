"""Tabulate a Hydra multirun's final metrics: `python -m tdd_lightning.training.sweep_report <multirun dir>`.

Each job folder holds .hydra/overrides.yaml and the metrics.json that `train.py` writes at the end.
Prints a markdown table (one row per job: the swept overrides, then the chosen metrics).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

DEFAULT_METRICS = ("train/loss", "train/samples_per_s", "global_step")


def collect(multirun_dir: Path) -> list[dict]:
    rows = []
    for job in sorted(p.parent.parent for p in multirun_dir.glob("*/.hydra/overrides.yaml")):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        rows.append(
            {"job": job.name, "overrides": dict(o.split("=", 1) for o in overrides), "metrics": metrics}
        )
    return rows


def to_markdown(rows: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    # only the overrides that differ between jobs are columns
    keys = sorted({k for r in rows for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1] or keys
    head = ["job", *swept, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["overrides"].get(k, "") for k in swept]
        if r["metrics"] is None:
            values += ["(no metrics: failed or running)"] + [""] * (len(metrics) - 1)
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
    (a.multirun_dir / "report.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
