"""Phase timing of the real training step: an exclusive phase timer, a timed loader and a Lightning callback.

Nothing here forks the step's code. Phases come from hooks around it:
- UNet forward pre/post hooks, keyed by the active role (``LoRARoles.active``): teacher, target, student;
- Lightning callback hooks: student backward (on_before_backward -> on_after_backward), optimizer
  (on_before_optimizer_step -> the EMA update, i.e. clipping + AdamW), step boundaries;
- instance-level wrappers of ``roles.update_target`` (EMA), ``module.distillation_loss`` (step maths:
  what remains of it once the UNet passes are taken out), ``module.log``/``log_dict`` and the loggers'
  ``log_metrics`` (logging), and the loader's ``next`` (data).
With the adversarial term (``--adversarial hinge``), also: the teacher's feature passes of the real and the
fake (``module.real_features`` / ``fake_features``, not counted as "teacher fwd"), the heads' forwards, and
"adv bwd": the backward from its start until the gradient reaches the student's prediction (the heads' and
the generator's backward through the frozen teacher), which "student bwd" would otherwise include.
Whatever is left of the step is "other" (Lightning's loop, zero_grad, lr scheduler, batch transfer).
Nested phases are exclusive (the outer one pauses), so the phases and "other" sum to the step time.
On CUDA every phase boundary synchronises, so GPU work lands in the phase that queued it.

Clocks: ``wall`` (perf_counter, the figure of record) or ``cpu`` (the main thread's CPU time; with one
torch thread all the work runs on it, so this figure hardly moves when other processes share the cores).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import lightning as L
import torch

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


class PhaseTimer:
    """Exclusive seconds per named phase on ``clock``, recorded only while ``armed``."""

    def __init__(
        self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.sync, self.clock = sync or (lambda: None), clock
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, start of its current slice]
        self.armed = False

    def now(self) -> float:
        self.sync()
        return self.clock()

    def start(self, name: str) -> None:
        if not self.armed:
            return
        now = self.now()
        if self.stack:
            outer = self.stack[-1]
            self.totals[outer[0]] += now - outer[1]
        self.stack.append([name, now])

    def stop(self, name: str) -> None:
        if not self.armed or not self.stack or self.stack[-1][0] != name:
            return
        now = self.now()
        top = self.stack.pop()
        self.totals[top[0]] += now - top[1]
        if self.stack:
            self.stack[-1][1] = now  # the outer phase resumes

    def close_all(self) -> None:
        while self.stack:
            self.stop(self.stack[-1][0])

    def take(self) -> dict[str, float]:
        """The totals since the last ``take`` (then reset)."""
        out, self.totals = dict(self.totals), defaultdict(float)
        return out

    @contextmanager
    def __call__(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)


def timed(timer: PhaseTimer, name: str, fn: Callable) -> Callable:
    """``fn`` whose calls count as phase ``name``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with timer(name):
            return fn(*args, **kwargs)

    return wrapper


class TimedLoader:
    """An iterable over ``loader`` whose ``next`` counts as the phase ``data``."""

    def __init__(self, loader: Iterable, timer: PhaseTimer):
        self.loader, self.timer = loader, timer

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        while True:
            with self.timer("data"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


ROLE_PHASE = {"teacher": "teacher fwd", "target": "target fwd", "student": "student fwd"}
ADVERSARIAL_PHASES = ("adv real fwd", "adv fake fwd", "heads", "adv bwd")


def instrument(module, timer: PhaseTimer) -> list:
    """Attach the UNet hooks and the wrappers to a TDDModule; returns the hook handles (``.remove()``)."""
    roles = module.roles
    teacher_batches: list[int] = []
    module.bench_teacher_batches = teacher_batches

    tap = getattr(module, "feature_tap", None)

    def feature_pass() -> bool:  # the adversarial term's teacher passes are timed as their own phases
        return tap is not None and tap.capturing

    def pre(_, args, kwargs):
        if feature_pass():
            return
        x = args[0] if args else kwargs["sample"]
        if roles.active == "teacher" and timer.armed:  # the measured steps' teacher batches
            teacher_batches.append(int(x.shape[0]))
        timer.start(ROLE_PHASE[roles.active])

    def post(_, args, kwargs, out):
        if not feature_pass():
            timer.stop(ROLE_PHASE[roles.active])

    handles = [
        module.unet.register_forward_pre_hook(pre, with_kwargs=True),
        module.unet.register_forward_hook(post, with_kwargs=True),
    ]
    update_target = roles.update_target

    def ema(decay: float) -> None:
        timer.stop("optimizer")
        with timer("ema"):
            update_target(decay)

    roles.update_target = ema
    module.distillation_loss = timed(timer, "step maths", module.distillation_loss)
    module.log = timed(timer, "logging", module.log)
    module.log_dict = timed(timer, "logging", module.log_dict)
    if tap is not None:
        instrument_adversarial(module, timer)
    return handles


def instrument_adversarial(module, timer: PhaseTimer) -> None:
    """The adversarial term's phases (``ADVERSARIAL_PHASES``); ``StepProfiler`` opens "adv bwd"."""
    module.real_features = timed(timer, "adv real fwd", module.real_features)
    module.fake_features = timed(timer, "adv fake fwd", module.fake_features)
    heads = module.discriminator
    heads.forward = timed(timer, "heads", heads.forward)  # the generator's functional call comes here too
    terms = module.adversarial_terms

    def adversarial_terms(out, generators):
        result = terms(out, generators)
        if out["pred"].requires_grad:  # the gradient reaching the prediction ends "adv bwd"
            out["pred"].register_hook(lambda grad: timer.stop("adv bwd"))
            module.bench_adv_backward = True
        return result

    module.adversarial_terms = adversarial_terms


class StepProfiler(L.Callback):
    """Per-step phase records after ``warmup`` steps; runs ``on_arm(trainer)`` once before the first
    measured step and ``between(trainer)`` after each, outside the timed window (the standalone passes,
    interleaved with the steps so that both see the same machine load). Past
    ``deadline`` (a perf_counter time) the fit stops once ``min_steps`` steps are recorded."""

    def __init__(
        self,
        timer: PhaseTimer,
        warmup: int,
        between: Callable | None = None,
        deadline: float = float("inf"),
        min_steps: int = 3,
        on_arm: Callable | None = None,
    ):
        self.timer, self.warmup, self.between, self.on_arm = timer, warmup, between, on_arm
        self.deadline, self.min_steps = deadline, min_steps
        self.records: list[dict[str, float]] = []
        self.last_end: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            logger.log_metrics = timed(self.timer, "logging", logger.log_metrics)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.timer.start("student bwd")
        if getattr(pl_module, "bench_adv_backward", False):  # the adversarial part of it comes first
            pl_module.bench_adv_backward = False
            self.timer.start("adv bwd")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.timer.stop("student bwd")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.timer.start("optimizer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        timer = self.timer
        timer.close_all()
        now = timer.now()
        if timer.armed:
            phases = timer.take()
            phases["step"] = now - self.last_end
            phases["other"] = phases["step"] - sum(v for k, v in phases.items() if k != "step")
            self.records.append(phases)
            if len(self.records) >= self.min_steps and time.perf_counter() > self.deadline:
                trainer.should_stop = True  # the time budget is spent
        if trainer.global_step >= self.warmup:
            if timer.armed and self.between is not None:
                timer.armed = False  # the standalone passes are not part of any step
                self.between(trainer)
            elif not timer.armed and self.on_arm is not None:
                self.on_arm(trainer)
            timer.take()
            timer.armed = True
            now = timer.now()
        self.last_end = now


def cuda_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(
    fn: Callable, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter
) -> float:
    sync()
    t0 = clock()
    fn()
    sync()
    return clock() - t0
