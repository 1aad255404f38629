"""TDDScheduler: the few-step sampler of Target-Driven Distillation as a diffusers scheduler.

Wang et al., "Target-Driven Distillation", arXiv 2409.01347; see docs/ALGORITHM.md section 4.
Any diffusers pipeline can use it::

    pipe.scheduler = TDDScheduler.from_config(pipe.scheduler.config)
    image = pipe(prompt, num_inference_steps=4, eta=0.2, guidance_scale=1.7).images[0]

Timesteps come from the training grid (the K-step schedules whose points form the target set M). Each
step predicts x0_hat at t_i, DDIM-jumps to s_{i+1} = floor((1 - eta) t_{i+1}) and, when eta > 0,
re-noises from s_{i+1} back to t_{i+1} with fresh noise (gamma sampling). The last step returns x0_hat.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from tdd_lightning.diffusion import (
    PREDICTION_TYPES,
    SCHEDULES,
    NoiseSchedule,
    alphas_cumprod_from_config,
    check_prediction_type,
    ddim_jump,
    target_set,
    tdd_timesteps,
    to_eps_x0,
    unhonoured_keys,
    x0_to_eps,
)
from tdd_lightning.diffusion import add_noise as forward_noise
from tdd_lightning.strategies.inference import RECOMMENDED

Generators = torch.Generator | list[torch.Generator] | None
_WARNED: set[str] = set()  # from_config's messages, each warned once per process


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (one generator per sample
    when given a list), then moved to x's device."""
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([_randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@dataclass
class TDDSchedulerOutput(BaseOutput):
    """Output of :meth:`TDDScheduler.step`.

    prev_sample: the latents for the next step (x_{t_{i+1}}), or x0_hat after the last step.
    denoised: x0_hat, the clean prediction at the current step (after clipping, if it applied).
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor


class TDDSchedulerBase(SchedulerMixin, ConfigMixin):
    """What the TDD schedulers share around their step (``TDDScheduler``, ``TDDFlowScheduler``): the trained
    grid's checks and target set, ``from_config`` keeping the keys TDD honours, the step index bookkeeping
    the pipelines drive, and eta's checks. Subclasses set ``_unhonoured`` (the base config's keys that warn)
    and ``_dropped`` (keys always replaced)."""

    order = 1
    _unhonoured = staticmethod(unhonoured_keys)
    _dropped: tuple[str, ...] = ()

    def _init_grid(self, k_min: int, k_max: int, num_teacher_steps: int, num_train_timesteps: int) -> None:
        """Checks the trained range; sets ``trained_timesteps`` = M u {T-1}, the timesteps the model was
        trained to start from and jump to, and the pre-``set_timesteps`` state."""
        if not 1 <= k_min <= k_max <= num_teacher_steps:
            raise ValueError(f"need 1 <= k_min <= k_max <= num_teacher_steps, got {k_min}, {k_max}")
        self.trained_timesteps = sorted(
            set(target_set(k_min, k_max, num_teacher_steps, num_train_timesteps)) | {num_train_timesteps - 1}
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._eta_warned = False

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config`` (e.g. of a pipeline's scheduler config), keeping the keys TDD honours.

        Each other key warns by name, once (``_unhonoured``: e.g. ``use_karras_sigmas=True`` of an Euler
        config, a ``timestep_spacing`` other than 'trailing' for TDDScheduler). Keys the config only holds as
        its class defaults (``_use_default_values``) are not the model's: dropped.
        """
        config = dict(config or {})
        defaults = set(config.get("_use_default_values", ()))
        given = {k: v for k, v in config.items() if k not in defaults and not k.startswith("_")} | kwargs
        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        for message in cls._unhonoured(given, known):
            _warn_once(f"{cls.__name__}.from_config: {message}")
        kept = {k: v for k, v in given.items() if k in known and k not in cls._dropped}
        return super().from_config(kept, return_unused_kwargs=return_unused_kwargs)

    # ---- step index bookkeeping (the pipelines call set_begin_index for img2img) ----

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` call; None before the first."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep the pipeline runs (set with ``set_begin_index``)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _init_step_index(self, timestep: torch.Tensor | float) -> None:
        self._step_index = (
            self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        )

    def index_for_timestep(self, timestep: torch.Tensor | float) -> int:
        hits = (self.timesteps.cpu() == torch.as_tensor(timestep).to(self.timesteps.dtype).cpu()).nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in the schedule {self.timesteps.tolist()}")
        return int(hits.flatten()[0])

    # ---- the contract ----

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """No input scaling (variance-preserving latents; flow latents need none either)."""
        return sample

    # ---- eta ----

    @staticmethod
    def _check_eta(eta: float) -> None:
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")

    def _resolve_eta(self, eta: float | None) -> float:
        eta = float(self.config.eta if eta is None else eta)
        self._check_eta(eta)
        if eta > self.config.trained_s_ratio and not self._eta_warned:
            self._eta_warned = True
            warnings.warn(
                f"{type(self).__name__}: eta={eta} is above the trained s_ratio="
                f"{self.config.trained_s_ratio}; the model never learned jumps that long "
                "(recommended eta 0 to 0.3)",
                stacklevel=3,
            )
        return eta


class TDDScheduler(TDDSchedulerBase):
    """Few-step TDD sampler (ALGORITHM.md section 4): trained grid schedules, eta sampling, early x0 clipping.

    Config keys beyond the diffusers noise schedule (num_train_timesteps, beta_* (linear, scaled_linear,
    squaredcos_cap_v2), trained_betas, rescale_betas_zero_snr, prediction_type: epsilon, v_prediction or
    sample; eps prediction with a zero-terminal-SNR schedule is refused):
      timestep_spacing: only 'trailing': the timesteps are the training grid, which starts at T-1.
        ``from_config`` of a base config with another spacing warns by name and uses 'trailing'; every
        other key of a base config that TDD cannot honour warns by name too (``unhonoured_keys``).
      num_teacher_steps: N, the teacher grid size used in training (grid 3, 7, ..., 999 for N=250).
      k_min, k_max: the trained range of step counts; M is the union of their K-step schedules.
      schedule: 'auto' (non-equidistant for K in [k_min, k_max], equidistant outside, with a warning),
        'nonequidistant' (error outside the range) or 'equidistant'.
      eta: gamma of the stochastic sampler, used when ``step`` gets ``eta=None``. Stock diffusers
        pipelines always pass their own ``eta`` (SDXL: default 0.0) to ``step``, and that wins: pass
        ``eta=0.2`` to the pipeline call to get the recommended sampler.
      trained_s_ratio: the s_ratio used in training; a larger eta warns once.
      clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value:
        x0 clamping or dynamic thresholding (Saharia et al. 2022), off by default; choose ranges for
        latents (SDXL latents span about [-4, 4], not [-1, 1]).
      clip_steps: t_l, clip only during the first t_l steps of the schedule; None clips at every step.
    """

    _dropped = ("timestep_spacing",)  # always 'trailing'

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "trailing",
        num_teacher_steps: int = 250,
        k_min: int = 4,
        k_max: int = 8,
        schedule: str = "auto",
        eta: float = RECOMMENDED.eta,
        trained_s_ratio: float = 0.3,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        clip_steps: int | None = None,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
        if timestep_spacing != "trailing":
            raise ValueError(
                f"timestep_spacing={timestep_spacing!r}: TDDScheduler's timesteps are its training grid, "
                "which starts at T-1 ('trailing', the only spacing it has)"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
        self._init_grid(k_min, k_max, num_teacher_steps, num_train_timesteps)
        self._check_eta(eta)
        if clip_steps is not None and clip_steps < 0:
            raise ValueError(f"clip_steps must be None or >= 0, got {clip_steps}")

        abar = alphas_cumprod_from_config(self.config)
        check_prediction_type(prediction_type, float(abar[-1]))
        self.alphas_cumprod = abar.float()  # what other diffusers code expects to find
        self._abar = abar  # float64, for the re-noising ratio
        self._schedule = NoiseSchedule(abar)
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """Set the schedule: K = ``num_inference_steps`` steps by the configured rule, or custom
        ``timesteps`` (strictly descending integers in [0, T-1])."""
        cfg = self.config
        if timesteps is not None:
            ts = self._validate_timesteps(timesteps)
            if num_inference_steps is not None and num_inference_steps != len(ts):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} disagrees with {len(ts)} custom timesteps"
                )
        elif num_inference_steps is not None:
            ts = tdd_timesteps(
                num_inference_steps,
                cfg.k_min,
                cfg.k_max,
                cfg.num_teacher_steps,
                cfg.num_train_timesteps,
                cfg.schedule,
            )
        else:
            raise ValueError("set_timesteps needs num_inference_steps or timesteps")
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self.num_inference_steps = len(ts)
        self._step_index = None
        self._begin_index = None

    @property
    def grid_indices(self) -> torch.Tensor:
        """The steps' positions on the training schedule's index grid: the timesteps themselves (as
        ``TDDFlowScheduler.grid_indices``, whose timesteps are sigma * T)."""
        return self.timesteps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | int,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> TDDSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One TDD step from t_i = timesteps[step_index] (ALGORITHM.md section 4).

        x0_hat at t_i (clipped during the first ``clip_steps`` steps); DDIM jump to
        s = floor((1 - eta) t_{i+1}); if eta > 0, re-noise s -> t_{i+1} with noise from ``generator``:
        x = sqrt(abar_t / abar_s) x + sqrt(1 - abar_t / abar_s) z. The last step returns x0_hat.
        ``eta=None`` uses ``config.eta``. Computed in float32, returned in the sample's dtype.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self.timesteps):
            raise IndexError(f"step {i} is past the end of the {len(self.timesteps)}-step schedule")
        eta = self._resolve_eta(eta)

        x, out = sample.float(), model_output.float()
        t = int(self.timesteps[i])
        a_t, sigma_t = self._a_sigma(t, x)
        x0_hat, eps_hat = self._x0_eps(out, x, a_t, sigma_t)
        clipped = self.clip_x0(i, x0_hat)
        if clipped is not x0_hat:
            x0_hat, eps_hat = clipped, x0_to_eps(x, clipped, a_t, sigma_t)

        if i == len(self.timesteps) - 1:
            prev = x0_hat  # the clean prediction, as LCM and TCD samplers end
        else:
            t_next = int(self.timesteps[i + 1])
            s = math.floor((1.0 - eta) * t_next)
            prev = ddim_jump(x, eps_hat, a_t, sigma_t, *self._a_sigma(s, x), x0=x0_hat)
            if eta > 0 and s < t_next:
                ratio = float(self._abar[t_next] / self._abar[s])  # abar_t / abar_s <= 1
                prev = math.sqrt(ratio) * prev + math.sqrt(1.0 - ratio) * _randn_like(prev, generator)

        self._step_index = i + 1
        prev, x0_hat = prev.to(sample.dtype), x0_hat.to(sample.dtype)
        if not return_dict:
            return prev, x0_hat
        return TDDSchedulerOutput(prev_sample=prev, denoised=x0_hat)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        """Forward process x_t = a_t x0 + sigma_t eps (one timestep, or one per sample)."""
        t = torch.as_tensor(timesteps).reshape(-1).cpu()
        a_t, sigma_t = self._schedule.a_sigma(t, like=original_samples)
        return forward_noise(original_samples, noise, a_t, sigma_t)

    # ---- helpers ----

    def _a_sigma(self, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._schedule.a_sigma(torch.tensor([t]), like)

    def _x0_eps(
        self, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, sigma_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the model output for the configured prediction type."""
        eps, x0 = to_eps_x0(out, x, a_t, sigma_t, self.config.prediction_type)
        return x0, eps

    def clip_x0(self, i: int, x0_hat: torch.Tensor) -> torch.Tensor:
        """x0_hat at step ``i`` as ``step`` uses it: clipped during the first ``clip_steps`` steps when
        clipping is configured, else the same tensor (``tdd_sample(clip_x0=...)`` samples the same way)."""
        return self._clip(x0_hat) if self._clips_at(i) else x0_hat

    def _clips_at(self, i: int) -> bool:
        cfg = self.config
        on = cfg.clip_sample or cfg.thresholding
        return bool(on) and (cfg.clip_steps is None or i < cfg.clip_steps)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, Imagen section 2.3) and/or a plain clamp."""
        cfg = self.config
        if cfg.thresholding:
            flat = x0.reshape(x0.shape[0], -1).abs()
            s = torch.quantile(flat, cfg.dynamic_thresholding_ratio, dim=1)
            s = s.clamp(min=1.0, max=cfg.sample_max_value).view((-1,) + (1,) * (x0.ndim - 1))
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def _validate_timesteps(self, timesteps: Sequence[int] | torch.Tensor) -> list[int]:
        return validate_timesteps(timesteps, self.config.num_train_timesteps, self.trained_timesteps)


def validate_timesteps(timesteps: Sequence[int] | torch.Tensor, T: int, trained: Sequence[int]) -> list[int]:
    """Custom timesteps as a list: strictly descending integers in [0, T-1]; a warning names those outside
    the ``trained`` set (M u {T-1})."""
    values = torch.as_tensor(timesteps).reshape(-1).tolist()
    if not values:
        raise ValueError("custom timesteps must not be empty")
    if any(float(v) != int(v) for v in values):
        raise ValueError(f"custom timesteps must be integers, got {values}")
    ts = [int(v) for v in values]
    if any(not 0 <= t < T for t in ts):
        raise ValueError(f"custom timesteps must lie in [0, {T - 1}], got {ts}")
    if any(a <= b for a, b in zip(ts[:-1], ts[1:], strict=True)):
        raise ValueError(f"custom timesteps must be strictly descending, got {ts}")
    off = [t for t in ts if t not in trained]
    if off:
        warnings.warn(
            f"TDDScheduler: custom timesteps {off} are not in the trained set M u {{{T - 1}}}",
            stacklevel=4,
        )
    return ts
