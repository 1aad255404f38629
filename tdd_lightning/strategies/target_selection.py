"""Target-timestep selection: which time s the student jumps to from t (ALGORITHM.md sections 2.3-2.4, 5).

Every strategy has the same two calls:
- ``sample_times(batch_size, generator)`` -> (t, t'): start time on the teacher grid and the teacher's
  end time t' = max(t - T/N, 0);
- ``select(t_prime, generator)`` -> s: the target time;
one parameterisation, ``consistency(x, eps, t, s, schedule, x0=None)``: the map from (x at t, the
model's eps and x0 from ``diffusion.to_eps_x0``; x0 None: derived from eps) to the point the student
and the target are compared at; and ``inference_schedule()``: the scheduler settings a LoRA trained
with it carries (grid, step range, trained s_ratio, recommended steps and eta).
"""

from __future__ import annotations

import inspect

import torch

from tdd_lightning.diffusion import (
    NoiseSchedule,
    boundary_scalings,
    ddim_jump,
    k_step_schedule,
    lcm_consistency,
    target_set,
    teacher_grid,
)
from tdd_lightning.strategies.base import check, randint, uniform
from tdd_lightning.strategies.inference import InferenceSchedule


class TargetSelection:
    """Base class: the teacher grid and the DDIM-jump parameterisation (TDD, TCD, PCM)."""

    name = "base"
    parameterisation = "ddim"

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._init_args = (args, kwargs)  # for with_grid: the same strategy on another teacher grid
        return self

    def __init__(self, num_teacher_steps: int = 250, num_train_timesteps: int = 1000):
        check(
            num_teacher_steps > 0 and num_train_timesteps % num_teacher_steps == 0,
            "num_teacher_steps",
            num_teacher_steps,
            f"the teacher grid size N must divide T={num_train_timesteps}",
        )
        self.N, self.T = num_teacher_steps, num_train_timesteps
        self.k = num_train_timesteps // num_teacher_steps  # timesteps per teacher step
        self.grid = torch.tensor(teacher_grid(num_teacher_steps, num_train_timesteps))

    def sample_times(
        self, batch_size: int, generator: torch.Generator | None = None, device="cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t = g_j with j ~ U{0..N-1}, and t' = max(t - k, 0)."""
        j = randint(self.N, batch_size, generator)
        t = self.grid[j].to(device)
        return t, (t - self.k).clamp(min=0)

    def select(self, t_prime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def consistency(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor,
        schedule: NoiseSchedule,
        x0: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DDIM jump from t straight to s."""
        a_t, sigma_t = schedule.a_sigma(t, x)
        a_s, sigma_s = schedule.a_sigma(s, x)
        return ddim_jump(x, eps, a_t, sigma_t, a_s, sigma_s, x0=x0)

    def comparison_time(self, s: torch.Tensor) -> torch.Tensor:
        """The time of the points ``consistency`` gives (where the adversarial term re-noises from): s."""
        return s

    def inference_schedule(self) -> InferenceSchedule:
        """The schedule a LoRA trained with this strategy is sampled with. Base: the default step range
        on the grid, no eta jumps trained (LCM)."""
        return InferenceSchedule.default_range(self.N, trained_s_ratio=0.0)

    def describe(self) -> dict:
        return {"name": self.name, "N": self.N, "parameterisation": self.parameterisation}

    def with_grid(self, num_teacher_steps: int) -> TargetSelection:
        """The same strategy, built with the same arguments, on a teacher grid of ``num_teacher_steps``
        (a coarse-to-fine schedule of N: ``training.callbacks.TeacherGridSchedule``)."""
        args, kwargs = self._init_args
        bound = inspect.signature(type(self).__init__).bind(self, *args, **kwargs).arguments
        bound.pop("self")
        return type(self)(**{**bound, "num_teacher_steps": num_teacher_steps})


class TDDSelection(TargetSelection):
    """TDD: s near the largest point m* of M below t', from the window [m* - W, m*], with a gamma offset."""

    name = "tdd"

    def __init__(
        self,
        num_teacher_steps: int = 250,
        k_min: int = 4,
        k_max: int = 8,
        window: int = 260,
        s_ratio: float = 0.3,
        num_train_timesteps: int = 1000,
    ):
        super().__init__(num_teacher_steps, num_train_timesteps)
        check(1 <= k_min <= k_max, "k_min", (k_min, k_max), "need 1 <= k_min <= k_max")
        check(k_max <= num_teacher_steps, "k_max", k_max, f"must be <= num_teacher_steps={num_teacher_steps}")
        check(window >= 0, "window", window, "must be >= 0")
        check(0.0 <= s_ratio < 1.0, "s_ratio", s_ratio, "must lie in [0, 1)")
        self.k_min, self.k_max, self.window, self.s_ratio = k_min, k_max, window, s_ratio
        self.M = torch.tensor(target_set(k_min, k_max, num_teacher_steps, num_train_timesteps))

    def candidates(self, t_prime: int) -> list[int]:
        """C(t') = {m in M : m* - W <= m <= m*}, m* = max{m in M : m <= t'}."""
        m_star = int(self.M[self.M <= t_prime].max())
        return [int(m) for m in self.M if m_star - self.window <= m <= m_star]

    def select(self, t_prime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        M = self.M.to(t_prime.device)
        n = t_prime.shape[0]
        # index of m* (M is sorted, M[0] = 0 <= t')
        star = torch.searchsorted(M, t_prime, right=True) - 1
        m_star = M[star]
        lo = torch.searchsorted(M, m_star - self.window, right=False)
        # tau ~ uniform over M[lo..star]
        width = (star - lo + 1).double()
        u_tau = uniform(n, generator, t_prime.device)
        tau = M[lo + (u_tau * width).long().clamp(max=(width - 1).long())]
        u = uniform(n, generator, t_prime.device)
        return torch.floor((1.0 - u * self.s_ratio) * tau.double()).long()

    def inference_schedule(self) -> InferenceSchedule:
        """The trained range K_min..K_max; eta up to the gamma offset s_ratio was trained."""
        return InferenceSchedule.trained(self.N, self.k_min, self.k_max, self.s_ratio)

    def describe(self) -> dict:
        return super().describe() | {"K": [self.k_min, self.k_max], "W": self.window, "s_ratio": self.s_ratio}


class LCMSelection(TargetSelection):
    """LCM: the target is the teacher's next grid point (s = t'); boundary-scaled consistency function."""

    name = "lcm"
    parameterisation = "boundary"

    def __init__(
        self,
        num_teacher_steps: int = 50,
        sigma_data: float = 0.5,
        timestep_scaling: float = 10.0,
        num_train_timesteps: int = 1000,
    ):
        super().__init__(num_teacher_steps, num_train_timesteps)
        check(sigma_data > 0, "sigma_data", sigma_data, "must be > 0")
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def select(self, t_prime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return t_prime.clone()

    def consistency(self, x, eps, t, s, schedule, x0=None):
        """f(x, t) = c_skip(t) x + c_out(t) x0_hat: maps to time 0 whatever s (LCM's parameterisation)."""
        a_t, sigma_t = schedule.a_sigma(t, x)
        c_skip, c_out = boundary_scalings(t, self.sigma_data, self.timestep_scaling)
        view = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out = c_skip.to(x).view(view), c_out.to(x).view(view)
        return lcm_consistency(x, eps, a_t, sigma_t, c_skip, c_out, x0=x0)

    def comparison_time(self, s: torch.Tensor) -> torch.Tensor:
        """The consistency function's points are estimates of x0: time 0."""
        return torch.zeros_like(s)


class TCDSelection(TargetSelection):
    """TCD: s uniform over {0} and the grid points <= t' (trajectory mapping to any earlier time)."""

    name = "tcd"

    def __init__(self, num_teacher_steps: int = 50, num_train_timesteps: int = 1000):
        super().__init__(num_teacher_steps, num_train_timesteps)
        self.points = torch.cat([torch.zeros(1, dtype=torch.long), self.grid])

    def select(self, t_prime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        points = self.points.to(t_prime.device)
        count = torch.searchsorted(points, t_prime, right=True)  # number of points <= t' (>= 1: 0 is one)
        u = uniform(t_prime.shape[0], generator, t_prime.device)
        idx = (u * count.double()).long().clamp(max=count - 1)
        return points[idx]

    def inference_schedule(self) -> InferenceSchedule:
        """The default step range; every earlier s was trained, so any eta was (s_ratio 1)."""
        return InferenceSchedule.default_range(self.N, trained_s_ratio=1.0)


class PCMSelection(TargetSelection):
    """PCM: P phases with edges on the P-step schedule; s = lower edge of the phase that contains t.

    Edges for P = 4, N = 250: 0, 251, 499, 751 (phase tops 251, 499, 751, 999). For t on the grid,
    s = max{e : e < t} <= t'.
    """

    name = "pcm"

    def __init__(self, num_teacher_steps: int = 250, num_phases: int = 4, num_train_timesteps: int = 1000):
        super().__init__(num_teacher_steps, num_train_timesteps)
        check(1 <= num_phases <= num_teacher_steps, "num_phases", num_phases, "must lie in [1, N]")
        self.P = num_phases
        edges = k_step_schedule(num_phases, num_teacher_steps, num_train_timesteps)[1:]
        self.edges = torch.tensor(sorted([0, *edges]))

    def select(self, t_prime: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        # t = t' + k on the grid; phase lower edge = the largest edge strictly below t, i.e. <= t'
        edges = self.edges.to(t_prime.device)
        return edges[torch.searchsorted(edges, t_prime, right=True) - 1]

    def inference_schedule(self) -> InferenceSchedule:
        """Exactly the P-step schedule (the phase edges); no eta jumps trained."""
        return InferenceSchedule.trained(self.N, self.P, self.P, 0.0)

    def describe(self) -> dict:
        return super().describe() | {"phases": self.P}
