"""Execute notebooks headless with nbclient; the stored notebooks (kept without outputs) are not touched.

    python notebooks/execute.py [--out DIR] [--timeout S] [NOTEBOOK ...]   (default: every notebook here)

Executed copies, with their outputs, go to DIR when given (``make notebooks``: logs/notebooks/).
Exit code 1 if a cell fails, with the notebook, the cell number and the error on one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent


def execute(path: str | Path, out_dir: str | Path | None = None, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in a fresh python3 kernel started in the notebook's folder."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    finally:
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(out_dir) / path.name)
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Execute notebooks headless (nbclient).")
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/*.ipynb)")
    p.add_argument("--out", default=None, help="write the executed copies here")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    a = p.parse_args(argv)
    paths = [Path(n) for n in a.notebooks] or sorted(HERE.glob("*.ipynb"))
    failed = 0
    for path in paths:
        try:
            execute(path, a.out, a.timeout)
            print(f"ok      {path}")
        except CellExecutionError as e:
            failed += 1
            last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
            print(f"FAILED  {path}: {last}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
