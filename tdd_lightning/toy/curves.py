"""Quality curves during training on the toy: a small evaluation every ``every_n_steps`` steps.

At every ``every_n_steps``-th step and at the last one, rank 0 samples each evaluated LoRA role (the
student and, when the run keeps it, the evaluation EMA ``ema``: ``module.eval_ema_decay`` > 0) on the
first ``n`` held-out prompts at each (steps, eta) cell with inference CFG ``guidance``, scores the images
with the shipped evaluator, and logs the metrics to every logger at the global step:
``eval/<metric>/<k>steps_eta<eta>`` for the student (the names of the end-of-run table's metrics) and
``eval_ema/...`` for the EMA, so csv and wandb show quality against steps next to the loss. The teacher's
agreement reference (``teacher_steps`` DDIM steps) is sampled once and cached on disk like the table's.
When training ends it writes ``<out_dir>/curves.csv`` and ``quality_curves.png``.

FD is biased upwards at small n: the curves' FD (n = 250) is comparable along a curve and between runs
with the same n, not with the final table's (n = 1,000). The curve is restored with a resumed run.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch

from tdd_lightning.checkpoint_io import atomic_write
from tdd_lightning.errors import check, check_int, check_ints, check_number
from tdd_lightning.toy.callback import (
    ROLE_NAMES,
    check_toy_inputs,
    log_images,
    metric_key,
    module_suite,
    recorded_scheduler,
    teacher_suite,
)

METRICS = ("prompt_acc", "fd", "agree")


class ToyQualityCurves(L.Callback):
    def __init__(
        self,
        evaluator: str,
        data: str,
        every_n_steps: int = 100,
        steps: list[int] = (4, 8),
        etas: list[float] = (0.0, 0.2),
        guidance: float = 1.0,
        roles: list[str] = ("student", "ema"),
        teacher_steps: int = 50,
        teacher_guidance: float = 2.0,
        n: int = 250,
        seed: int = 0,
        cache_dir: str | None = None,
        out_dir: str | None = None,
    ):
        self.evaluator, self.data = evaluator, data
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.steps, self.guidance = check_ints("steps", steps), check_number("guidance", guidance, 0.0)
        check(hasattr(etas, "__len__") and len(etas) > 0, "etas", etas, "must be a non-empty list in [0, 1]")
        self.etas = [check_number("etas", e, 0.0, 1.0) for e in etas]
        ok = not isinstance(roles, str) and hasattr(roles, "__len__") and len(roles) > 0
        ok = ok and all(r in ROLE_NAMES for r in roles)
        check(ok, "roles", roles, f"must be a non-empty list of {', '.join(ROLE_NAMES)}")
        self.roles = list(roles)
        self.teacher_steps = check_int("teacher_steps", teacher_steps)
        self.teacher_guidance = check_number("teacher_guidance", teacher_guidance, 0.0)
        self.n, self.seed = check_int("n", n), check_int("seed", seed, 0)
        self.cache_dir, self.out_dir = cache_dir, out_dir
        self.history: list[dict[str, float]] = []  # one row per evaluation: {"step": ..., <metric key>: ...}
        self._suite = None

    # ---- state: the curve survives a resume ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(r) for r in state.get("history", [])]

    # ---- hooks ----------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module):
        check_toy_inputs(self.evaluator, self.data, "toy_curves")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            self.evaluate(trainer, pl_module)  # the last point (a no-op if this step was evaluated)
        if trainer.is_global_zero and self.history:
            self.write(Path(self.out_dir or trainer.default_root_dir), trainer)

    # ---- evaluation -----------------------------------------------------------------------------------
    def suite_kwargs(self) -> dict:
        return {"n": self.n, "ref_steps": self.teacher_steps, "ref_guidance": self.teacher_guidance,
                "cache_dir": self.cache_dir, "progress": False}  # fmt: skip

    def suite(self, pl_module):
        if self._suite is None:
            self._suite = module_suite(pl_module, self.evaluator, self.data, **self.suite_kwargs())
        return self._suite

    @torch.no_grad()
    def warm(self, teacher: str, uncond: str | None) -> None:
        """Sample and cache the agreement reference (``toy.warm``): the curves then only read it."""
        check_toy_inputs(self.evaluator, self.data, "toy_curves")
        suite = teacher_suite(
            teacher, uncond, self.evaluator, self.data, **{**self.suite_kwargs(), "progress": True}
        )
        suite.reference_features(self.seed)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float] | None:
        """Score every role at every cell now; log and keep the row (rank 0; once per global step)."""
        step = trainer.global_step
        if step == 0 or not trainer.is_global_zero or (self.history and self.history[-1]["step"] == step):
            return None
        from tdd_lightning.pipelines import Setting
        from tdd_lightning.toy.suite import student_timesteps

        suite = self.suite(pl_module)
        timesteps = student_timesteps(recorded_scheduler(pl_module))  # what the exported LoRA would carry
        roles = [r for r in self.roles if r in pl_module.roles.adapters]  # ema only when the run keeps it
        unet, row = pl_module.unet, {"step": step}
        was_training = unet.training
        unet.eval()
        try:
            for role in roles:
                with pl_module.roles.role(role):
                    for eta in self.etas:
                        for k in self.steps:
                            res, _ = suite.cell(unet, timesteps, Setting(k, eta, self.guidance, self.seed))
                            row |= {metric_key(m, k, eta, role): float(res[m]) for m in METRICS}
        finally:
            unet.train(was_training)
        self.history.append(row)
        metrics = {k: v for k, v in row.items() if k != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        return row

    # ---- files ----------------------------------------------------------------------------------------
    def write(self, out: Path, trainer) -> dict[str, Path]:
        """curves.csv (one row per evaluation) and quality_curves.png; the plot also goes to wandb."""
        from tdd_lightning.toy.report import plot_curves

        out.mkdir(parents=True, exist_ok=True)
        columns = ["step", *sorted({k for r in self.history for k in r} - {"step"})]

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(self.history)

        paths = {"csv": atomic_write(out / "curves.csv", write_csv)}
        title = f"quality during training (n = {self.n} prompts, CFG {self.guidance:g})"
        plot = plot_curves(self.history, out / "quality_curves.png", title)
        if plot is not None:
            paths["plot"] = plot
            log_images(trainer, {"plot": plot}, "eval/curves")
        return paths
