"""The rectified-flow noise process on TDD's integer grid: x_t = (1 - sigma_t) x0 + sigma_t eps (ALGORITHM.md
section 8).

A flow model (FLUX, SD3) predicts the velocity v = eps - x0. With a_t = 1 - sigma_t this is the same
two-coefficient process as the VP one (``NoiseSchedule``), so the DDIM jump a_s x0_hat + sigma_s eps_hat,
the teacher's step and the re-noising of eta sampling are the VP formulas with a = 1 - sigma, and the
training step, the target selection and the few-step sampler run unchanged on (a_t, sigma_t).

Timesteps stay integers 0..T-1 (the teacher grid, the K-step schedules, the target set M and the s_ratio
offset are built on them, ``diffusion.grids``). Index t maps to the base time u = (t + 1) / T (as diffusers'
``FlowMatchEulerDiscreteScheduler`` lays out its training sigmas: grid point g_j = (T/N) j - 1 has u = j/N
exactly) and then through the model's shift:

- static: sigma = shift u / (1 + (shift - 1) u);
- dynamic (``use_dynamic_shifting``, FLUX.1): mu grows linearly with the image's token count, from
  ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len`` (the FLUX
  pipelines' ``calculate_shift``), and sigma = e^mu / (e^mu + (1/u - 1)) (``time_shift_type``
  exponential; linear: mu / (mu + (1/u - 1))). Static shift s is the exponential form with mu = ln s.

Training and inference use this ONE mapping: the training step computes mu from the latent's shape
(``a_sigma(t, like)``, tokens = (H / patch) (W / patch)), the scheduler from the mu the pipeline passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from tdd_lightning.diffusion.ops import append_dims

TIME_SHIFT_TYPES = ("exponential", "linear")
# FlowMatchEulerDiscreteScheduler config keys and the values at which they change nothing TDD does
FLOW_INERT_KEYS = {
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
    "use_flow_sigmas": None,
}
FLOW_SCHEDULE_KEYS = (
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
    "base_image_seq_len", "max_image_seq_len", "time_shift_type",
)  # fmt: skip


def flow_unhonoured_keys(config: Mapping[str, Any], known: Iterable[str] = ()) -> list[str]:
    """One message per key of a flow scheduler ``config`` that TDD cannot honour: neither a key of the shift
    (``FLOW_SCHEDULE_KEYS``), nor in ``known``, nor inert at its value (``FLOW_INERT_KEYS``)."""
    known = set(known) | set(FLOW_SCHEDULE_KEYS)
    out = []
    for key, value in config.items():
        if key.startswith("_") or key in known:
            continue
        if key in FLOW_INERT_KEYS and (FLOW_INERT_KEYS[key] is None or FLOW_INERT_KEYS[key] == value):
            if key != "shift_terminal" or not value:
                continue
        out.append(f"{key}={value!r} is not honoured by TDD (ignored)")
    return out


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu for ``image_seq_len`` image tokens: linear from (base_seq_len, base_shift) to (max_seq_len,
    max_shift), extrapolated beyond (the FLUX pipelines' rule)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_sigmas(u: torch.Tensor, mu: float, time_shift_type: str = "exponential") -> torch.Tensor:
    """The shifted sigma of base times ``u`` in (0, 1] (float64): e^mu / (e^mu + 1/u - 1), or the linear
    form mu / (mu + 1/u - 1)."""
    u = u.double()
    scale = math.exp(mu) if time_shift_type == "exponential" else float(mu)
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type={time_shift_type!r} is not one of {TIME_SHIFT_TYPES}")
    return torch.where(u > 0, scale / (scale + (1.0 / u.clamp(min=1e-300) - 1.0)), torch.zeros_like(u))


def renoise_coefficients(
    a_t: torch.Tensor, sigma_t: torch.Tensor, a_s: torch.Tensor, sigma_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, std) of the re-noising x_t = scale x_s + std z from s back to a noisier t, for the process
    x = a x0 + sigma eps: scale = a_t / a_s, std = sqrt(sigma_t^2 - (a_t sigma_s / a_s)^2) (ALGORITHM.md 8.3).

    It keeps the marginal: a_t / a_s (a_s x0 + sigma_s eps) + std z has mean a_t x0 and variance
    (a_t sigma_s / a_s)^2 + std^2 = sigma_t^2. For VP (a^2 + sigma^2 = 1) std^2 = 1 - a_t^2 / a_s^2.
    """
    scale = a_t / a_s
    return scale, (sigma_t**2 - (scale * sigma_s) ** 2).clamp(min=0.0).sqrt()


class FlowSchedule(torch.nn.Module):
    """sigma_t (and a_t = 1 - sigma_t) at integer timesteps, through the model's (possibly dynamic) shift.

    The same interface as ``NoiseSchedule``: ``a_sigma(t, like)``, ``renoise(x, t, s, z)``,
    ``num_train_timesteps``, ``terminal_abar``; plus ``model_time`` (what the transformer is given:
    sigma * T, divided by T again inside the FLUX call as the pipelines do) and ``mu_for``.
    """

    kind = "flow"

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
        patch_size: int = 2,
    ):
        super().__init__()
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type={time_shift_type!r} is not one of {TIME_SHIFT_TYPES}")
        if not use_dynamic_shifting and not shift > 0:
            raise ValueError(f"shift={shift} must be > 0")
        self.T = int(num_train_timesteps)
        self.shift, self.dynamic = float(shift), bool(use_dynamic_shifting)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_seq_len, self.max_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.time_shift_type, self.patch_size = time_shift_type, int(patch_size)
        base = torch.arange(1, self.T + 1, dtype=torch.float64) / self.T  # u of t = 0..T-1
        self.register_buffer("base", base, persistent=False)
        self._cache: dict[float, torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], patch_size: int = 2) -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` (or TDDFlowScheduler) config."""
        config = dict(config)
        kwargs = {k: config[k] for k in FLOW_SCHEDULE_KEYS if config.get(k) is not None}
        return cls(**kwargs, patch_size=patch_size)

    def describe(self) -> dict[str, Any]:
        """The shift as recorded in checkpoints and exported LoRAs."""
        if self.dynamic:
            return {
                "type": "dynamic",
                "base_shift": self.base_shift,
                "max_shift": self.max_shift,
                "base_image_seq_len": self.base_seq_len,
                "max_image_seq_len": self.max_seq_len,
                "time_shift_type": self.time_shift_type,
            }
        return {"type": "static", "shift": self.shift}

    @property
    def num_train_timesteps(self) -> int:
        return self.T

    @property
    def terminal_abar(self) -> float:
        """a_{T-1}^2 = 0: sigma = 1 at t = T-1 whatever the shift (pure noise)."""
        return 0.0

    # ---- the shift -----------------------------------------------------------------------------------
    def image_seq_len(self, like: torch.Tensor) -> int:
        """Image tokens of an unpacked latent [B, C, H, W]: (H / patch) (W / patch)."""
        if like.ndim < 4:
            raise ValueError(
                f"the dynamic shift needs an unpacked latent [B, C, H, W] (got shape {tuple(like.shape)}); "
                "pass mu explicitly"
            )
        return (like.shape[-2] // self.patch_size) * (like.shape[-1] // self.patch_size)

    def mu_for(self, like: torch.Tensor | None = None, image_seq_len: int | None = None) -> float:
        """mu of the shift: ln(shift) when static (exponential type); from the token count when dynamic."""
        if not self.dynamic:
            return math.log(self.shift) if self.time_shift_type == "exponential" else self.shift
        if image_seq_len is None:
            if like is None:
                raise ValueError("the dynamic shift needs the latent (or its image_seq_len) to compute mu")
            image_seq_len = self.image_seq_len(like)
        return calculate_shift(
            image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift
        )

    def sigmas_of_base(self, u: torch.Tensor, mu: float) -> torch.Tensor:
        """sigma (float64) of base times u through the shift with ``mu``."""
        return shift_sigmas(u, mu, self.time_shift_type)

    def sigma_table(self, mu: float) -> torch.Tensor:
        """sigma_t for t = 0..T-1 (float64), cached per mu."""
        key = float(mu)
        table = self._cache.get(key)
        if table is None or table.device != self.base.device:
            table = self.sigmas_of_base(self.base, key)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = table
        return table

    def sigmas_at(self, t: torch.Tensor, mu: float) -> torch.Tensor:
        """sigma (float64) at timesteps ``t``: integers on the table, other (float) values through the shift
        of u = (t + 1) / T (custom inference sigmas)."""
        if not torch.is_floating_point(t):
            return self.sigma_table(mu)[t.long().to(self.base.device)]
        return self.sigmas_of_base((t.double() + 1.0) / self.T, mu)

    # ---- the NoiseSchedule interface -----------------------------------------------------------------
    def a_sigma(
        self, t: torch.Tensor, like: torch.Tensor, mu: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - sigma_t, sigma_t) for timesteps t of shape [B], shaped [B, 1, ..., 1] like ``like``
        (float64 maths, returned in ``like``'s dtype). ``mu`` None: the shift of ``like``'s size."""
        mu = self.mu_for(like) if mu is None else mu
        sigma = self.sigmas_at(t, mu)
        a = (1.0 - sigma).to(like.device, like.dtype)
        return append_dims(a, like.ndim), append_dims(sigma.to(like.device, like.dtype), like.ndim)

    def renoise(
        self, x: torch.Tensor, t: int | float, s: int | float, z: torch.Tensor, mu: float | None = None
    ) -> torch.Tensor:
        """x at s re-noised to the noisier t with noise z (``renoise_coefficients`` in float64)."""
        mu = self.mu_for(x) if mu is None else mu
        sig = self.sigmas_at(torch.tensor([t, s]), mu)
        scale, std = renoise_coefficients(1.0 - sig[0], sig[0], 1.0 - sig[1], sig[1])
        return scale.to(x.dtype) * x + std.to(x.dtype) * z

    def model_time(self, t: torch.Tensor, like: torch.Tensor, mu: float | None = None) -> torch.Tensor:
        """The timestep a diffusers flow pipeline gives its transformer for index t: float32 sigma_t * T
        (the pipelines pass ``timesteps = sigmas * T`` and call the model with ``timestep / T``)."""
        mu = self.mu_for(like) if mu is None else mu
        return self.sigmas_at(t, mu).float().to(like.device) * self.T
