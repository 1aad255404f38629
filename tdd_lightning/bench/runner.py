"""One benchmark run: the real training step under Lightning (phases), the floor, the naive mode, FLOPs.

Order: fit ``warmup + steps`` steps with the phase profiler; after each measured step (outside its
timed window) one set of standalone floor passes, so that step times and floor times interleave and
see the same machine load; then the naive mode on the same UNet; then FLOPs on the meta device.
With ``--adversarial hinge`` the same is measured again (no naive mode, no ablation) for the step with the
adversarial term, on the same model folder, in the same process: ``result["adversarial"]``.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tdd_lightning.bench.build import BenchConfig, build
from tdd_lightning.bench.floor import FLOOR, FloorPasses, ablation_summary
from tdd_lightning.bench.timing import (
    ADVERSARIAL_PHASES,
    CLOCKS,
    PhaseTimer,
    StepProfiler,
    TimedLoader,
    cuda_sync,
    instrument,
    time_call,
)

PHASES = (
    "data",
    "teacher fwd",
    "target fwd",
    "student fwd",
    "student bwd",
    "step maths",
    "optimizer",
    "ema",
    "logging",
    "other",
)
# the adversarial step's phases: the plain ones and the term's own (bench.timing), "other" last
ALL_PHASES = (*PHASES[:-1], *ADVERSARIAL_PHASES, "other")


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_bench(cfg: BenchConfig, out_dir: Path | None = None) -> dict:
    if cfg.clock == "cpu" and (cfg.threads != 1 or cfg.device != "cpu"):
        raise ValueError("--clock cpu measures the main thread: use it with --threads 1 on the CPU")
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="tdd-bench-") as tmp:
        return _run(cfg, Path(out_dir or tmp))


def _sync_debug_step(loader, trainer, module) -> list[str]:
    """CUDA only: the host syncs of one training step, as 'file:line function' of our code (one step)."""
    found: list[str] = []
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        import traceback

        ours = [
            f
            for f in traceback.extract_stack()
            if "tdd_lightning" in f.filename and "bench" not in f.filename
        ]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "(library)"
        found.append(f"{where}: {str(message).splitlines()[0][:80]}")

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            batch = next(iter(loader))
            batch = {
                k: v.to(module.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
            torch.cuda.synchronize()  # the harness's own copy and sync are not the step's: dropped
            found.clear()
            with trainer.precision_plugin.forward_context():
                module.distillation_loss(batch, module.step_generators(module.device))["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = show
    for p in module.roles.student_params:
        p.grad = None
    return found


@dataclass
class Measured:
    """What the instrumented fit leaves: per-step phase records, floor times, naive step times, memory."""

    trainer: object
    records: list[dict]
    floor_times: dict[str, list[float]]
    naive_times: list[float]
    cuda_peak_gib: float | None
    naive_records: list[dict] = field(default_factory=list)  # the naive steps' phase seconds


def _run(cfg: BenchConfig, out_dir: Path) -> dict:
    """Build, fit with the phase profiler (floor passes and naive steps between the measured steps), then
    the statistics, the host syncs (``sync_debug``), FLOPs and the machine into one result dict."""
    result = _measure(cfg, out_dir)
    if cfg.adversarial != "none":
        adv_cfg = dataclasses.replace(
            cfg,
            overrides=[*cfg.overrides, f"adversarial={cfg.adversarial}"],
            naive_steps=0,
            ablation=False,
            sync_debug=False,
            pretrained=cfg.pretrained or result["pretrained"],
        )
        result["adversarial"] = _measure(adv_cfg, out_dir / "adversarial", ALL_PHASES)
    return result


def _measure(cfg: BenchConfig, out_dir: Path, phases: tuple[str, ...] = PHASES) -> dict:
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    built = build(cfg, out_dir)
    module = built.module
    measured = _fit(cfg, built, out_dir, device, t_start)
    syncs = None
    if cfg.sync_debug and device.type == "cuda":
        syncs = _sync_debug_step(built.loader, measured.trainer, module)

    stats = aggregate(measured.records, measured.floor_times, module.bench_teacher_batches, phases)
    naive_stats = naive_summary(
        measured.naive_times, stats["step_times_s"], cfg.batch, measured.naive_records
    )
    return {
        "config": {k: v for k, v in vars(cfg).items() if k != "overrides"},
        "machine": machine(device, cfg.threads),
        "unet_params": sum(p.numel() for n, p in module.unet.named_parameters() if "lora_" not in n),
        "lora_params": sum(p.numel() for p in module.roles.student_params),
        **stats,
        "samples_per_s": cfg.batch / stats["step_s"],
        "bare": "a separate UNet without LoRA"
        if built.bare is not None
        else "the teacher role (adapters off)",
        "naive": naive_stats,
        "ablation": ablation_summary(measured.floor_times) if cfg.ablation else None,
        "naive_ratio": naive_stats["ratio"] if naive_stats else None,
        "flops": flop_summary(cfg, built, stats, device),
        "peak_rss_mib": rss_peak_mib(),
        "cuda_peak_gib": measured.cuda_peak_gib,
        "host_syncs": syncs,
        "wall_s": time.perf_counter() - t_start,
        "pretrained": str(built.pretrained) if built.pretrained is not None else None,
    }


def _fit(cfg: BenchConfig, built, out_dir: Path, device: torch.device, t_start: float) -> Measured:
    """``warmup + steps`` training steps under Lightning with the phase timers on; after each measured
    step (outside its timed window) one set of floor passes and, while wanted, one naive step."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger

    module = built.module
    sync = cuda_sync(device)
    clock = CLOCKS[cfg.clock]
    timer = PhaseTimer(sync, clock)
    floor = FloorPasses(module, built.bare, sync, clock, seed=cfg.seed, ablation=cfg.ablation)
    handles = instrument(module, timer)

    naive, naive_times = None, []

    def on_arm(trainer) -> None:  # before the first measured step: inputs, and the naive mode's warm-up
        nonlocal naive
        batch = next(iter(built.loader))
        floor.capture({k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()})
        if cfg.naive_steps > 0 and built.pretrained is not None:
            naive = make_naive(cfg, module, built.pretrained, device, sync, clock)
            run_naive(naive, trainer)

    def between(trainer) -> None:  # after each measured step: the floor passes, then a naive step
        floor.run(module.bench_teacher_batches[-1], trainer.precision_plugin.forward_context())
        if naive is not None and len(naive_times) < cfg.naive_steps:
            naive_times.append(run_naive(naive, trainer, sync, clock, record=True))

    budget = cfg.budget_s or float("inf")
    profiler = StepProfiler(timer, cfg.warmup, between, deadline=t_start + 0.8 * budget, on_arm=on_arm)
    trainer: L.Trainer = instantiate(
        built.trainer_cfg,
        max_steps=cfg.warmup + cfg.steps,
        logger=CSVLogger(str(out_dir), name="bench"),
        callbacks=[profiler],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(eval mode|num_workers|does not have many workers).*")
        trainer.fit(module, train_dataloaders=TimedLoader(built.loader, timer))
    timer.armed = False
    for h in handles:
        h.remove()
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    naive_records = naive.records if naive is not None else []
    return Measured(trainer, profiler.records, floor.times, naive_times, cuda_peak, naive_records)


def naive_summary(
    naive_times: list[float], step_times: list[float], batch: int, records: list[dict] | None = None
) -> dict | None:
    """The naive mode against our steps: each naive step paired with the measured step it followed;
    ``records``: its steps' phase seconds (their means go into ``phases_mean_s``)."""
    if not naive_times:
        return None
    from tdd_lightning.bench.naive import phase_means

    paired = [n / s for n, s in zip(naive_times, step_times, strict=False)]
    out = {"step_s": median(naive_times), "steps": len(naive_times), "ratio": median(paired)}
    out["ours_same_steps_s"] = median(step_times[: len(naive_times)])
    out["samples_per_s"] = batch / out["step_s"]
    out["phases_mean_s"] = phase_means(records or [])
    return out


def flop_summary(cfg: BenchConfig, built, stats: dict, device: torch.device) -> dict:
    """FLOPs of one step (meta device), achieved TFLOP/s and MFU; an ``error`` entry if counting fails."""
    try:
        from tdd_lightning.bench.flops import peak_tflops, step_flops

        B, module = cfg.batch, built.module
        tb = stats["teacher_batch_mean"] or 2 * B
        lora_cfg = module.model_cfg.get("lora", {})
        targets = lora_cfg.get("target_modules") or module.family.lora_targets
        per_pass = step_flops(
            built.unet_config, lora_cfg | {"rank": cfg.rank}, targets, B, tb, built.text, module.family
        )
        total = sum(per_pass.values())
        peak = cfg.peak_tflops or peak_tflops(device, cfg.precision)
        step = stats["step_s"]
        return {
            "per_pass": per_pass,
            "step": total,
            "achieved_tflops": total / step / 1e12,
            "peak_tflops": peak,
            "mfu": total / step / (peak * 1e12) if peak else None,
        }
    except Exception as e:  # FLOP counting is informative only: never fail the benchmark over it
        return {"error": f"{type(e).__name__}: {e}"}


def aggregate(
    records: list[dict],
    floor_times: dict[str, list[float]],
    teacher_batches: list[int],
    phases: tuple[str, ...] = PHASES,
) -> dict:
    """Step and floor statistics. Each measured step i is paired with the floor passes timed right after
    it at the same teacher batch: the ratios are medians of these pairs, which a changing machine load
    hardly moves. The phase table averages the steps no slower than 1.5x the median step (steps slowed
    down by other processes are counted, not averaged in), so the phases still sum to its step time."""
    steps = [r["step"] for r in records]
    step = median(steps)
    typical = [r for r in records if r["step"] <= 1.5 * step]
    n = len(records)
    floor_i = [sum(floor_times[k][i] for k in FLOOR) for i in range(n)]
    bare = floor_times["bare fwd"]
    return {
        "steps": n,
        "step_times_s": steps,
        "floor_totals_s": floor_i,
        "step_s": step,
        "steps_excluded": n - len(typical),
        "step_mean_s": statistics.fmean(r["step"] for r in typical),
        "phases_mean_s": {k: statistics.fmean(r.get(k, 0.0) for r in typical) for k in phases},
        "teacher_batch_mean": statistics.fmean(teacher_batches) if teacher_batches else None,
        "floor_s": {k: median(v) for k, v in floor_times.items()},
        "floor_total_s": median(floor_i),
        "overhead_ratio": median([s / f for s, f in zip(steps, floor_i, strict=True)]),
        "lora_vs_bare": {
            role: median([a / b for a, b in zip(floor_times[f"{role} fwd"], bare, strict=True)])
            for role in ("student", "target")
        },
    }


def make_naive(cfg: BenchConfig, module, pretrained: Path, device, sync=None, clock=time.perf_counter):
    from tdd_lightning.bench.naive import NaiveTrainer

    encoder = module.family.encoder_from_pretrained(pretrained).to(device)
    return NaiveTrainer(module, encoder, cfg.batch, device, seed=cfg.seed, sync=sync, clock=clock)


def run_naive(naive, trainer, sync=lambda: None, clock=time.perf_counter, record: bool = False) -> float:
    """One naive step (in the trainer's precision context), timed (``record``: and its phases); the
    module's state restored after."""
    naive.enter()
    try:
        context = trainer.precision_plugin.forward_context()
        return time_call(lambda: naive.step(context, record=record), sync, clock)
    finally:
        naive.exit()


def machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    omp = os.environ.get("OMP_WAIT_POLICY", "unset")
    cores = f"{os.cpu_count()} cores, {threads} threads (OMP_WAIT_POLICY={omp})"
    return f"{cpu}, {cores}, torch {torch.__version__}"
