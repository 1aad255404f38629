"""TDDFlowScheduler: the few-step TDD sampler for rectified-flow models (FLUX), as a diffusers scheduler.

The same sampler as ``TDDScheduler`` (ALGORITHM.md sections 4 and 8) on x_t = (1 - sigma) x0 + sigma eps
with a velocity model (v = eps - x0): the K-step schedules of the training grid, each index mapped to sigma
through the model's shift (static, or dynamic from the ``mu`` the pipeline computes from the image size,
exactly as training mapped them), a jump along the predicted velocity x_s = x_t + (sigma_s - sigma_t) v to
s = floor((1 - eta) t_{i+1}), and with eta > 0 the re-noising from s back to t_{i+1}. The last step returns
x0_hat = x_t - sigma_t v (what an Euler step to sigma = 0 gives). A stock ``FluxPipeline`` uses it::

    pipe.scheduler = TDDFlowScheduler.from_config(pipe.scheduler.config, k_min=4, k_max=8)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.5).images[0]

What ``FluxPipeline`` passes: ``set_timesteps(sigmas=linspace(1, 1/K, K), mu=...)`` (its default sigmas for
K steps, which mean "K steps" here: the trained K-step schedule is used; any other ``sigmas`` are custom
base sigmas, shifted like ``FlowMatchEulerDiscreteScheduler`` shifts them), and ``step(out, t, latents)``
without eta or generator: ``config.eta`` applies, and the re-noising draws from the generator given to
``set_generator`` (None: the global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from tdd_lightning.diffusion import (
    FLOW_PREDICTION,
    SCHEDULES,
    FlowSchedule,
    ddim_jump,
    tdd_timesteps,
    to_eps_x0,
)
from tdd_lightning.diffusion.flow import flow_unhonoured_keys
from tdd_lightning.scheduling_tdd import (
    Generators,
    TDDSchedulerBase,
    TDDSchedulerOutput,
    _randn_like,
    validate_timesteps,
)
from tdd_lightning.strategies.inference import RECOMMENDED


def is_pipeline_default(sigmas: Sequence[float], num_steps: int) -> bool:
    """Whether ``sigmas`` are the FLUX pipelines' default for K steps, linspace(1, 1/K, K)."""
    values = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    K = len(values)
    return K == num_steps and np.allclose(values, np.linspace(1.0, 1.0 / K, K), rtol=0.0, atol=1e-6)


class TDDFlowScheduler(TDDSchedulerBase):
    """Few-step TDD sampler for flow models (ALGORITHM.md section 8).

    Config: the shift of ``FlowMatchEulerDiscreteScheduler`` (num_train_timesteps, shift,
    use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, time_shift_type),
    then TDD's: num_teacher_steps (N), k_min, k_max, schedule ('auto', 'nonequidistant', 'equidistant':
    ``diffusion.tdd_timesteps``), eta (used when ``step`` gets none, as from FluxPipeline), trained_s_ratio
    (a larger eta warns once).
    """

    _unhonoured = staticmethod(flow_unhonoured_keys)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        num_teacher_steps: int = 250,
        k_min: int = 4,
        k_max: int = 8,
        schedule: str = "auto",
        eta: float = RECOMMENDED.eta,
        trained_s_ratio: float = 0.3,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
        if num_train_timesteps % num_teacher_steps:
            raise ValueError(f"num_teacher_steps={num_teacher_steps} must divide T={num_train_timesteps}")
        self._init_grid(k_min, k_max, num_teacher_steps, num_train_timesteps)
        self._check_eta(eta)
        self.flow = FlowSchedule(
            num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift,
            base_image_seq_len, max_image_seq_len, time_shift_type,
        )  # fmt: skip
        self.mu: float | None = None
        self.generator: Generators = None
        self._indices = torch.arange(num_train_timesteps - 1, -1, -1)  # grid indices of the steps
        # before set_timesteps: every index, unshifted when the shift waits for the image size's mu
        identity = 0.0 if time_shift_type == "exponential" else 1.0
        mu = identity if use_dynamic_shifting else self.flow.mu_for(None)
        self.sigmas = torch.cat([self.flow.sigmas_at(self._indices, mu).float(), torch.zeros(1)])
        self.timesteps = self.sigmas[:-1] * num_train_timesteps

    def set_generator(self, generator: Generators) -> None:
        """The generator(s) of the eta re-noising when ``step`` gets none (FluxPipeline never passes one)."""
        self.generator = generator

    # ---- the schedule ----

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """K steps by the configured rule, custom grid ``timesteps`` (strictly descending integers in
        [0, T-1]) or custom base ``sigmas`` (descending in (0, 1], shifted like FlowMatchEulerDiscrete's;
        the pipelines' default linspace(1, 1/K, K) means K trained steps). ``mu``: the dynamic shift of the
        image size (required with ``use_dynamic_shifting``, ignored otherwise)."""
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is set (the image size's shift)")
        self.mu = float(mu) if cfg.use_dynamic_shifting else self.flow.mu_for(None)
        if timesteps is not None:
            indices = torch.tensor(validate_timesteps(timesteps, T, self.trained_timesteps))
        elif sigmas is not None and not is_pipeline_default(sigmas, len(np.asarray(sigmas).reshape(-1))):
            u = torch.as_tensor(np.asarray(sigmas, dtype=np.float64)).reshape(-1)
            if len(u) == 0 or (u <= 0).any() or (u > 1).any() or (u[:-1] <= u[1:]).any():
                raise ValueError(f"custom sigmas must be strictly descending in (0, 1], got {u.tolist()}")
            indices = u * T - 1.0  # continuous grid positions: index t has u = (t + 1) / T
        else:
            if num_inference_steps is None:
                if sigmas is None:
                    raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
                num_inference_steps = len(np.asarray(sigmas).reshape(-1))
            indices = torch.tensor(
                tdd_timesteps(
                    num_inference_steps, cfg.k_min, cfg.k_max, cfg.num_teacher_steps, T, cfg.schedule
                )
            )
        if num_inference_steps is not None and num_inference_steps != len(indices):
            raise ValueError(
                f"num_inference_steps={num_inference_steps} disagrees with {len(indices)} custom steps"
            )
        self._indices = indices
        sigma = self.flow.sigmas_at(indices, self.mu).float()
        self.sigmas = torch.cat([sigma, torch.zeros(1)]).to(device)
        self.timesteps = (sigma * T).to(device)
        self.num_inference_steps = len(indices)
        self._step_index = None
        self._begin_index = None

    @property
    def grid_indices(self) -> torch.Tensor:
        """The steps' positions on the training schedule's index grid (index t has base sigma (t + 1) / T):
        the timesteps the module's own sampler takes; they do not depend on ``mu``."""
        return self._indices

    def _a_sigma(self, index: int | float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flow.a_sigma(torch.tensor([index]), like, mu=self.mu)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: Generators = None,
        return_dict: bool = True,
    ) -> TDDSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One TDD step from t_i (ALGORITHM.md 8.2-8.3): x0_hat = x - sigma_t v; jump along v to
        s = floor((1 - eta) t_{i+1}); with eta > 0 re-noise s -> t_{i+1}:
        x = (a_t / a_s) x + sqrt(sigma_t^2 - (a_t sigma_s / a_s)^2) z. The last step returns x0_hat.
        Computed in float32, returned in the sample's dtype."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"step {i} is past the end of the {self.num_inference_steps}-step schedule")
        eta = self._resolve_eta(eta)
        x, out = sample.float(), model_output.float()
        t = self._index(i)
        a_t, sigma_t = self._a_sigma(t, x)
        eps_hat, x0_hat = to_eps_x0(out, x, a_t, sigma_t, FLOW_PREDICTION)
        if i == self.num_inference_steps - 1:
            prev = x0_hat
        else:
            t_next = self._index(i + 1)
            s = self._target(t_next, eta)
            prev = ddim_jump(x, eps_hat, a_t, sigma_t, *self._a_sigma(s, x), x0=x0_hat)
            if eta > 0 and s < t_next:
                z = _randn_like(prev, generator if generator is not None else self.generator)
                prev = self.flow.renoise(prev, t_next, s, z, mu=self.mu)
        self._step_index = i + 1
        prev, x0_hat = prev.to(sample.dtype), x0_hat.to(sample.dtype)
        if not return_dict:
            return prev, x0_hat
        return TDDSchedulerOutput(prev_sample=prev, denoised=x0_hat)

    def _index(self, i: int) -> int | float:
        value = self._indices[i]
        return int(value) if not torch.is_floating_point(value) else float(value)

    @staticmethod
    def _target(t_next: int | float, eta: float) -> int | float:
        """s = floor((1 - eta) t_next) (a grid index); a custom position below index 0 gets no jump."""
        if isinstance(t_next, int):
            return math.floor((1.0 - eta) * t_next)
        return min(t_next, max(math.floor((1.0 - eta) * t_next), 0))

    # ---- the forward process (img2img) ----

    def scale_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = sigma_t noise + (1 - sigma_t) sample at the pipeline's first step (``begin_index``), as
        FlowMatchEulerDiscreteScheduler.scale_noise (what FluxImg2ImgPipeline calls)."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timestep]
        elif self._step_index is not None:
            indices = [self._step_index] * timestep.shape[0]
        else:
            indices = [self._begin_index] * timestep.shape[0]
        sigma = sigmas[indices].flatten()
        while sigma.ndim < sample.ndim:
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise with sigma = timesteps / T (one value, or one per sample)."""
        sigma = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1) / self.config.num_train_timesteps
        sigma = sigma.to(original_samples.device, original_samples.dtype)
        sigma = sigma.view(-1, *(1,) * (original_samples.ndim - 1))
        return (1.0 - sigma) * original_samples + sigma * noise
