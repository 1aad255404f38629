"""Teacher, student and EMA target on ONE base UNet (ALGORITHM.md 2.5-2.7).

- teacher: base weights, adapters disabled (frozen, no grad);
- student: the trainable LoRA adapter ``student``;
- target: a second LoRA adapter ``target``, the EMA of the student's LoRA tensors;
- ema (optional, ``eval_ema=True``): a third adapter, a slow EMA of the student kept for evaluation and
  export only (the usual practice in consistency-model training); it never enters the training step.

peft's ``set_adapter`` / ``enable_adapters`` also rewrite ``requires_grad`` (activating the target would
make it trainable and freeze the student). Role switches here only flip which adapter is active on
each LoRA layer, so the trainable set never changes; the EMA is a foreach lerp over LoRA tensors only.
With ``fused`` (default) the LoRA layers compute fp32 forwards with merged weights W + s B A, at about
the bare UNet's cost (models/fused_lora.py); other dtypes keep peft's forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch

STUDENT, TARGET, EVAL_EMA = "student", "target", "ema"

# LoRA targets of the authors' SDXL run (ALGORITHM.md section 6)
SDXL_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip


def warmup_decay(decay: float, updates: int) -> float:
    """The evaluation EMA's decay after ``updates`` optimizer steps: min(decay, (1 + n) / (10 + n)).

    Without the warm-up a 0.999 EMA of a 600-step run would still hold 0.999^600 = 55% of the initial
    (teacher-equivalent) LoRA; with it the average covers roughly the last 10% of the steps early on and
    tends to the full decay (the schedule of diffusers' EMAModel)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def grad_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (0 when none has one; sharded: the full norm)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2): the global norm
        norm = norm.full_tensor()
    return norm


def lora_config(rank: int, alpha: float | None, target_modules: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules),
        init_lora_weights="gaussian",
    )


class LoRARoles:
    """Adds the student and target adapters to ``unet`` and switches between the three roles."""

    def __init__(
        self,
        unet: torch.nn.Module,
        rank: int,
        alpha: float | None,
        target_modules: Sequence[str],
        fused: bool = True,
        eval_ema: bool = False,
    ):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet = unet
        unet.requires_grad_(False)
        config = lora_config(rank, alpha, target_modules)
        unet.add_adapter(config, adapter_name=STUDENT)
        with warnings.catch_warnings():  # peft warns on a second adapter; two are the design
            warnings.simplefilter("ignore", UserWarning)
            unet.add_adapter(config, adapter_name=TARGET)
            if eval_ema:  # added last, so the student's initial draw is the same with or without it
                unet.add_adapter(config, adapter_name=EVAL_EMA)
        self.adapters = (STUDENT, TARGET, EVAL_EMA) if eval_ema else (STUDENT, TARGET)
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError(f"no LoRA layer matched target_modules={list(target_modules)}")
        self.set_fused(fused)
        self.collect_params()
        for p in self.student_params:
            p.requires_grad_(True)
        for p in self.target_params + self.ema_params:
            p.requires_grad_(False)
        self.copy_student_to_target()
        self.copy_student_to_ema()
        self.use(STUDENT)

    def collect_params(self) -> None:
        """(Re)collect the adapters' parameters, e.g. after FSDP replaced them with sharded ones."""
        self.student_params = self._adapter_params(STUDENT)
        self.target_params = self._adapter_params(TARGET)
        self.ema_params = self._adapter_params(EVAL_EMA) if EVAL_EMA in self.adapters else []

    def _adapter_params(self, name: str) -> list[torch.nn.Parameter]:
        key = f".{name}."
        return [p for n, p in self.unet.named_parameters() if "lora_" in n and key in n]

    def named_student_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{STUDENT}." in n}

    def set_fused(self, fused: bool) -> None:
        """Merged-weight fp32 LoRA forward (True) or peft's own forward (False); same numbers to ~1e-6."""
        from tdd_lightning.models.fused_lora import set_fused

        set_fused(self.layers, fused)
        self.fused = fused

    # ---- role switching -------------------------------------------------------------------------
    def use(self, role: str) -> None:
        """Make ``role`` ('teacher', 'student', 'target' or, when kept, 'ema') the UNet's behaviour."""
        if role == "teacher":
            for layer in self.layers:
                layer._disable_adapters = True
            self.active = role
            return
        if role not in self.adapters:
            known = ", ".join(repr(r) for r in ("teacher", *self.adapters))
            hint = " (the evaluation EMA is off: module.eval_ema_decay=0)" if role == EVAL_EMA else ""
            raise ValueError(f"unknown role {role!r}{hint}: use one of {known}")
        for layer in self.layers:
            layer._disable_adapters = False
            layer._active_adapter = [role]
        self.active = role

    @contextmanager
    def role(self, role: str):
        """Run a block as ``role``, then return to the student."""
        self.use(role)
        try:
            yield self.unet
        finally:
            self.use(STUDENT)

    # ---- EMA target ---------------------------------------------------------------------------------
    @torch.no_grad()
    def copy_student_to_target(self) -> None:
        torch._foreach_copy_(self.target_params, self.student_params)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """target <- decay * target + (1 - decay) * student (decay 0: copy; decay 1: hold)."""
        if decay == 0.0:
            self.copy_student_to_target()
        elif decay < 1.0:
            torch._foreach_lerp_(self.target_params, self.student_params, 1.0 - decay)

    # ---- evaluation EMA -------------------------------------------------------------------------------
    @torch.no_grad()
    def copy_student_to_ema(self) -> None:
        if self.ema_params:
            torch._foreach_copy_(self.ema_params, self.student_params)

    @torch.no_grad()
    def update_eval_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * student (a no-op when the evaluation EMA is off)."""
        if self.ema_params:
            torch._foreach_lerp_(self.ema_params, self.student_params, 1.0 - decay)
