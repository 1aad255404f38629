"""End-of-training evaluation on the toy shapes task: the metric table of the student next to its teacher.

When a run reaches ``max_steps`` (not when it is preempted or stopped early), rank 0 samples the
in-memory student (LoRA role ``role``) at each step count and eta, samples the teacher (DDIM, trailing
spacing, its cells cached on disk), scores everything with the shipped evaluator, prints the table and
writes ``<out_dir>/table.md``, ``results.json``, ``quality_vs_steps.png`` and ``grid.png``
(``python -m tdd_lightning.toy.eval`` does the same for exported LoRAs). Logged to wandb when it is a logger.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from tdd_lightning.errors import UserError, check, check_int, check_ints, check_number
from tdd_lightning.export import ROLES

ROLE_NAMES = ROLES  # the LoRA roles a toy callback can evaluate


def metric_key(metric: str, steps: int, eta: float, role: str = "student") -> str:
    """``eval/prompt_acc/4steps_eta0.2`` for the student, ``eval_ema/...`` (``eval_<role>``) otherwise."""
    prefix = "eval" if role == "student" else f"eval_{role}"
    return f"{prefix}/{metric}/{steps}steps_eta{eta:g}"


def recorded_scheduler(pl_module):
    """The TDDScheduler (a flow model's TDDFlowScheduler) of the module's recorded inference schedule:
    what its exported LoRA would carry (its K-step schedules are read as training-grid indices)."""
    from tdd_lightning.pipelines import tdd_scheduler
    from tdd_lightning.strategies import recorded_inference

    schedule, _ = recorded_inference(pl_module.hparams)
    meta = {"scheduler_config": schedule.scheduler_config(), "scheduler": pl_module.family.scheduler_class}
    return tdd_scheduler({}, meta)


def module_suite(pl_module, evaluator, data, **kwargs):
    """The toy Suite of the module's teacher (``model.pretrained``; UNet or flow toy teacher), with CFG's
    negative as the student was trained (``guidance.uncond``)."""
    uncond = getattr(pl_module.guidance, "uncond", None)
    teacher = pl_module.model_cfg["pretrained"]
    return teacher_suite(teacher, uncond, evaluator, data, device=pl_module.device, **kwargs)


def teacher_suite(teacher: str, uncond: str | None, evaluator, data, **kwargs):
    """``module_suite`` before there is a module (``toy.warm``): the teacher folder and CFG's negative."""
    from tdd_lightning.toy.suite import Suite

    return Suite.from_teacher(Path(teacher), evaluator, data, uncond=uncond, **kwargs)


def check_toy_inputs(evaluator: str, data: str, node: str) -> None:
    """Fail at the start of a run, not after training, if the evaluator or the held-out data is missing."""
    if not Path(evaluator, "config.json").is_file():
        raise UserError(f"callbacks.{node}.evaluator: no evaluator at {evaluator}")
    if not Path(data, "heldout").is_dir():
        raise UserError(f"callbacks.{node}.data: no held-out split in {data} (run `make shapes`)")


class ToyEvaluation(L.Callback):
    def __init__(
        self,
        evaluator: str,
        data: str,
        steps: list[int] = (1, 2, 4, 8),
        etas: list[float] = (0.0, 0.2),
        guidance: float = 1.0,
        teacher_steps: list[int] = (4, 50),
        teacher_guidance: float = 2.0,
        n: int = 1000,
        seed: int = 0,
        cache_dir: str | None = None,
        out_dir: str | None = None,
        role: str = "student",
        progress: bool = True,
    ):
        self.evaluator, self.data = evaluator, data
        self.steps, self.guidance = check_ints("steps", steps), check_number("guidance", guidance, 0.0)
        check(hasattr(etas, "__len__") and len(etas) > 0, "etas", etas, "must be a non-empty list in [0, 1]")
        self.etas = [check_number("etas", e, 0.0, 1.0) for e in etas]
        self.teacher_steps = check_ints("teacher_steps", teacher_steps)
        self.teacher_guidance = check_number("teacher_guidance", teacher_guidance, 0.0)
        self.n, self.seed = check_int("n", n), check_int("seed", seed, 0)
        check(role in ROLE_NAMES, "role", role, f"must be one of {', '.join(ROLE_NAMES)}")
        self.cache_dir, self.out_dir, self.role = cache_dir, out_dir, role
        self.progress = progress  # bars (stderr) over the sampling of each cell: the teacher's take minutes
        self.table: str | None = None

    def on_fit_start(self, trainer, pl_module):
        check_toy_inputs(self.evaluator, self.data, "toy_eval")

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:
            return
        self.table = self.evaluate(trainer, pl_module)

    def suite_kwargs(self) -> dict:
        return {"n": self.n, "ref_steps": max(self.teacher_steps), "ref_guidance": self.teacher_guidance,
                "cache_dir": self.cache_dir, "progress": self.progress}  # fmt: skip

    def grid(self):
        from tdd_lightning.toy.runner import Grid

        return Grid(
            self.steps,
            self.etas,
            [self.guidance],
            [self.seed],
            None,
            self.teacher_steps,
            self.teacher_guidance,
        )

    @torch.no_grad()
    def warm(self, teacher: str, uncond: str | None) -> None:
        """Sample and cache the teacher's cells (``toy.warm``): the run's table then only reads them."""
        check_toy_inputs(self.evaluator, self.data, "toy_eval")
        suite = teacher_suite(teacher, uncond, self.evaluator, self.data, **self.suite_kwargs())
        for s in self.grid().teacher_settings():
            suite.teacher_cell(s)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> str:
        from tdd_lightning.toy.runner import Student, run_grid, write_report

        teacher_dir = Path(pl_module.model_cfg["pretrained"])
        suite = module_suite(pl_module, self.evaluator, self.data, **self.suite_kwargs())
        selection = pl_module.hparams["target_selection"]
        scheduler = recorded_scheduler(pl_module)
        grid = self.grid()
        name = f"{selection.get('name', 'student').upper()} {self.role}"
        student = Student(name, Path("."), 0, [self.seed])
        unet = pl_module.unet
        was_training = unet.training
        unet.eval()
        try:
            with pl_module.roles.role(self.role):
                records, columns = run_grid(suite, [student], grid, lambda _: (unet, scheduler))
        finally:
            unet.train(was_training)
        out = Path(self.out_dir or trainer.default_root_dir)
        meta = {
            "n": self.n,
            "ref_steps": suite.ref_steps,
            "ref_guidance": self.teacher_guidance,
            "global_step": trainer.global_step,
            "teacher": str(teacher_dir),
        }
        paths = write_report(out, records, suite.real_rows(), grid, columns, suite.captions, meta)
        for r in records:  # into metrics.json (and sweep reports): eval/prompt_acc/4steps_eta0.2, ...
            if r["model"] == name:
                for m in ("prompt_acc", "fd", "agree"):
                    trainer.callback_metrics[metric_key(m, r["steps"], r["eta"], self.role)] = torch.tensor(
                        r[m]
                    )
        table = paths["table"].read_text()
        print(f"\nStudent after {trainer.global_step} steps vs the teacher ({out}):\n\n{table}", flush=True)
        log_images(trainer, paths, "eval/report")
        return table


def log_images(trainer, paths: dict[str, Path], key: str) -> None:
    """The PNGs among ``paths`` to every wandb logger of the run, under ``key``."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            images = [str(p) for p in paths.values() if p.suffix == ".png"]
            logger.log_image(key, images, step=trainer.global_step)
