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
import json
import os
import sys


def parse(argv: list[str] | None = None):
    from tdd_lightning.bench.build import BenchConfig

    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m tdd_lightning.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model, choices=["tiny", "sdxl_arch"], help="conf/model/<name>.yaml")
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default=d.precision, choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--sample-size", type=int, default=None, help="latent side (tiny 32, sdxl_arch 128)")
    p.add_argument("--channels", type=int, nargs="+", default=list(d.channels), help="tiny UNet blocks")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (tiny 8, sdxl_arch 64)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--clock",
        default=d.clock,
        choices=["wall", "cpu"],
        help="cpu: main-thread CPU time (with --threads 1)",
    )
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--steps", type=int, default=d.steps, help="measured training steps")
    p.add_argument("--naive-steps", type=int, default=d.naive_steps, help="0: skip the naive mode")
    p.add_argument(
        "--budget-s", type=float, default=d.budget_s, help="stop measuring early past this (0: never)"
    )
    p.add_argument("--lora", default=d.lora, choices=["fused", "peft"], help="LoRA forward")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--gradient-checkpointing", choices=["true", "false"], default=None)
    p.add_argument("--attention", default=d.attention, choices=["sdpa", "eager"])
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet forward (minutes on CPU)")
    p.add_argument("--pretrained", default=None, help="a tiny-style diffusers folder instead of building one")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: list the host syncs of one step")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. guidance.p_empty=0.5")
    a = p.parse_args(argv)
    sdxl = a.model == "sdxl_arch"
    cfg = BenchConfig(
        model=a.model,
        device=a.device,
        precision=a.precision,
        batch=a.batch,
        sample_size=a.sample_size or (128 if sdxl else d.sample_size),
        channels=tuple(a.channels),
        rank=a.rank or (64 if sdxl else d.rank),
        threads=a.threads,
        clock=a.clock,
        warmup=a.warmup,
        steps=a.steps,
        naive_steps=a.naive_steps,
        budget_s=a.budget_s,
        lora=a.lora,
        ema_decay=a.ema_decay,
        gradient_checkpointing=None
        if a.gradient_checkpointing is None
        else a.gradient_checkpointing == "true",
        attention=a.attention,
        compile=a.compile,
        pretrained=a.pretrained,
        sync_debug=a.sync_debug,
        peak_tflops=a.peak_tflops,
        overrides=list(a.overrides),
    )
    return cfg, a.json


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
    main()
