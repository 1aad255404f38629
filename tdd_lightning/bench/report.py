"""The benchmark's printed table and its one-line summary (``BENCH key=value ...``)."""

from __future__ import annotations

import torch

from tdd_lightning.bench.floor import FLOOR
from tdd_lightning.bench.runner import ALL_PHASES, PHASES

TARGETS = {"overhead": 1.05, "naive": 1.2, "lora": 1.15}


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{1e3 * s:8.1f}"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def format_report(r: dict) -> str:
    c = r["config"]
    tb = r["teacher_batch_mean"]
    lines = [
        f"tdd_lightning bench: model={c['model']} ({r['unet_params'] / 1e6:.2f} M params, "
        f"LoRA rank {c['rank']}: {r['lora_params'] / 1e3:.0f} k), batch {c['batch']}, {c['precision']}, "
        f"lora={c['lora']}, "
        f"ema_decay={c['ema_decay']}",
        f"machine: {r['machine']}; clock: {c['clock']}",
        f"{r['steps']} measured steps after {c['warmup']} warm-up; times are medians except the phase means",
        "",
        f"{'phase (mean per step)':28s} {'ms':>8s} {'share':>7s}",
    ]
    if r["steps_excluded"]:
        lines.insert(
            -1, f"({r['steps_excluded']} steps slower than 1.5x the median left out of the means: load)"
        )
    step_mean = r["step_mean_s"]
    for k in PHASES:
        v = r["phases_mean_s"][k]
        label = f"teacher fwd (B~{tb:.1f})" if k == "teacher fwd" and tb else k
        lines.append(f"{label:28s} {_ms(v)} {100 * v / step_mean:6.1f}%")
    lines += [
        f"{'step (mean of the above)':28s} {_ms(step_mean)}",
        f"{'step (median)':28s} {_ms(r['step_s'])}   -> {r['samples_per_s']:.2f} samples/s",
    ]
    if r.get("adversarial"):
        lines += format_adversarial(r)
    lines += [
        "",
        "compute floor (standalone passes, interleaved with the steps)",
    ]
    f = r["floor_s"]
    for k in FLOOR:
        lines.append(f"  {k:26s} {_ms(f.get(k))}")
    lines += [
        f"  {'floor total':26s} {_ms(r['floor_total_s'])}",
        f"overhead ratio = step / floor = {_x(r['overhead_ratio'])} (target <= {TARGETS['overhead']}; "
        f"median of {r['steps']} step/floor pairs)",
        "",
        f"LoRA vs bare UNet forward at batch {c['batch']}, medians of pairs (bare = {r['bare']}):",
        f"  bare {_ms(f.get('bare fwd')).strip()} ms, student {_ms(f.get('student fwd')).strip()} ms "
        f"({_x(r['lora_vs_bare']['student'])}), target {_ms(f.get('target fwd')).strip()} ms "
        f"({_x(r['lora_vs_bare']['target'])}) (target <= {TARGETS['lora']})",
        f"  student fwd with grad {_ms(f.get('student fwd (grad)')).strip()} ms, "
        f"student bwd {_ms(f.get('student bwd')).strip()} ms",
    ]
    if r.get("ablation") is not None:
        from tdd_lightning.bench.floor import bf16_supported, format_ablation

        lines += format_ablation(r["ablation"], bf16_supported(torch.device(c["device"])))
    n = r["naive"]
    if n:
        lines.append(
            f"naive mode: {1e3 * n['step_s']:.1f} ms/step ({n['samples_per_s']:.2f} samples/s; ours in the "
            f"same steps {1e3 * n['ours_same_steps_s']:.1f} ms); "
            f"ours / naive = {_x(r['naive_ratio'])} samples/s (target >= {TARGETS['naive']}; "
            f"median of {n['steps']} pairs)"
        )
        if n.get("phases_mean_s"):
            from tdd_lightning.bench.naive import format_phase_table

            lines += format_phase_table(n, r["phases_mean_s"], r["step_mean_s"])
    elif c["naive_steps"] == 0:
        lines.append("naive mode: not run (--naive-steps 0)")
    else:
        lines.append("naive mode: not run (needs a pipeline folder with VAE and text encoders)")
    fl = r["flops"] or {}
    if "step" in fl:
        mfu = f", MFU {100 * fl['mfu']:.1f}% of {fl['peak_tflops']:.0f} TFLOP/s" if fl.get("mfu") else ""
        lines.append(
            f"model FLOPs/step {fl['step'] / 1e9:.1f} G (teacher {fl['per_pass']['teacher fwd'] / 1e9:.1f}, "
            f"target {fl['per_pass']['target fwd'] / 1e9:.1f}, student fwd+bwd "
            f"{fl['per_pass']['student fwd+bwd'] / 1e9:.1f}): {1e3 * fl['achieved_tflops']:.1f} GFLOP/s{mfu}"
        )
    elif fl:
        lines.append(f"FLOPs: not counted ({fl.get('error')})")
    mem = f"peak RSS {r['peak_rss_mib']:.0f} MiB"
    if r["cuda_peak_gib"] is not None:
        mem += f", CUDA peak allocated {r['cuda_peak_gib']:.2f} GiB"
    lines.append(f"memory: {mem}")
    if r["host_syncs"] is not None:
        lines.append(f"host syncs in one step: {len(r['host_syncs'])}")
        lines += [f"  {s}" for s in r["host_syncs"]]
    lines.append(f"benchmark wall time {r['wall_s']:.0f} s")
    lines.append(summary_line(r))
    return "\n".join(lines)


def format_adversarial(r: dict) -> list[str]:
    """The adversarial step's phases next to the plain step's (same run): plain, adversarial, extra."""
    a, name = r["adversarial"], r["config"]["adversarial"]
    plain, adv = r["phases_mean_s"], a["phases_mean_s"]
    lines = [
        "",
        f"adversarial={name}: the step with the adversarial term ({a['steps']} measured steps, same model)",
        f"{'phase (mean per step)':28s} {'plain':>8s} {'adv':>8s} {'extra':>8s}",
    ]
    for k in ALL_PHASES:
        p, v = plain.get(k, 0.0), adv.get(k, 0.0)
        lines.append(f"{k:28s} {_ms(p)} {_ms(v)} {_ms(v - p)}")
    for label, key in (("step (mean of the above)", "step_mean_s"), ("step (median)", "step_s")):
        p, v = r[key], a[key]
        lines.append(f"{label:28s} {_ms(p)} {_ms(v)} {_ms(v - p)}   ({v / p:.2f}x the plain step)")
    return lines


def summary_line(r: dict) -> str:
    c, fl = r["config"], r["flops"] or {}
    items = {
        "model": c["model"],
        "device": c["device"],
        "precision": c["precision"],
        "batch": c["batch"],
        "lora": c["lora"],
        "step_ms": 1e3 * r["step_s"],
        "samples_per_s": r["samples_per_s"],
        "floor_ms": 1e3 * r["floor_total_s"],
        "overhead": r["overhead_ratio"],
        "naive_ratio": r["naive_ratio"],
        "lora_vs_bare_student": r["lora_vs_bare"]["student"],
        "lora_vs_bare_target": r["lora_vs_bare"]["target"],
        "mfu": fl.get("mfu"),
        "peak_rss_mib": r["peak_rss_mib"],
        "cuda_peak_gib": r["cuda_peak_gib"],
    }
    if r.get("adversarial"):
        items["adv_step_ms"] = 1e3 * r["adversarial"]["step_s"]
        items["adv_ratio"] = r["adversarial"]["step_s"] / r["step_s"]

    def fmt(v):
        if v is None:
            return "na"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return "BENCH " + " ".join(f"{k}={fmt(v)}" for k, v in items.items())
