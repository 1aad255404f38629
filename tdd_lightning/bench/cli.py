"""``python -m tdd_lightning.bench``: the training step, phase by phase, against its compute floor.

    python -m tdd_lightning.bench                     # tiny model, rank 8, batch 8, 4x32x32, fp32, CPU
    python -m tdd_lightning.bench --lora peft         # the same with peft's own LoRA forward
    python -m tdd_lightning.bench --threads 1 --clock cpu   # main-thread CPU time: steady on a busy machine
    python -m tdd_lightning.bench --model sdxl_arch --device cuda --precision bf16 --batch 4 \\
        --gradient-checkpointing true --naive-steps 0 --sync-debug

Prints the phase table, the floor, the overhead ratio, the LoRA-vs-bare ratio, the naive ratio, FLOPs
and memory, and a final ``BENCH key=value ...`` line (``--json PATH`` writes everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing


def _kind(tp) -> tuple[type, bool]:
    """(the base type, whether None is allowed) of a field annotation such as ``float | None``."""
    args = [t for t in typing.get_args(tp) if t is not type(None)]
    if isinstance(tp, types.UnionType) and len(args) == 1:
        return args[0], True
    return tp, False


def add_config_options(p: argparse.ArgumentParser, cls) -> None:
    """One option per field of the dataclass ``cls``, named, typed, defaulted and documented by the field
    (see ``bench.build.option``): ``bool`` -> a flag; ``bool | None`` -> true | false (default None);
    ``tuple[int, ...]`` -> one or more ints; ``X | None`` -> an X, default None; ``positional`` -> the
    trailing arguments; ``by_model`` -> default None, resolved by ``config_from_args``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, (tp, optional) = f.metadata, _kind(hints[f.name])
        kw = {"help": meta.get("help")}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if meta.get("positional"):
            p.add_argument(f.name, nargs="*", default=default, **kw)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool and not optional:
            p.add_argument(flag, action="store_true", **kw)
        elif tp is bool:
            p.add_argument(flag, choices=["true", "false"], default=None, **kw)
        elif typing.get_origin(tp) is tuple:
            p.add_argument(flag, type=typing.get_args(tp)[0], nargs="+", default=list(default), **kw)
        else:
            kw["default"] = None if "by_model" in meta else default
            p.add_argument(flag, type=tp, choices=meta.get("choices"), **kw)


def config_from_args(cls, a: argparse.Namespace):
    """The dataclass ``cls`` from parsed options (the inverse of ``add_config_options``)."""
    hints, values = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        value, (tp, optional) = getattr(a, f.name), _kind(hints[f.name])
        if tp is bool and optional and value is not None:
            value = value == "true"
        elif typing.get_origin(tp) is tuple or typing.get_origin(tp) is list:
            value = typing.get_origin(tp)(value)
        elif value is None and "by_model" in f.metadata:
            value = f.metadata["by_model"].get(a.model, f.default)
        values[f.name] = value
    return cls(**values)


def parse(argv: list[str] | None = None):
    """(BenchConfig, the ``--json`` path or None) from the command line."""
    from tdd_lightning.bench.build import BenchConfig

    p = argparse.ArgumentParser(prog="python -m tdd_lightning.bench", description=__doc__.split("\n\n")[0])
    add_config_options(p, BenchConfig)
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    a = p.parse_args(argv)
    return config_from_args(BenchConfig, a), a.json


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, json_path = parse(argv)
    from tdd_lightning.bench.report import format_report
    from tdd_lightning.bench.runner import run_bench

    result = run_bench(cfg)
    print(format_report(result), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2, default=str)
    sys.stdout.flush()


if __name__ == "__main__":
    from tdd_lightning.errors import exit_on_user_error

    exit_on_user_error(main)
