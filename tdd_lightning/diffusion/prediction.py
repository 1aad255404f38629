"""The model output of each prediction type as (eps, x0): the one conversion every step goes through.

A diffusers UNet predicts one of three things, named by its scheduler config's ``prediction_type``:
``epsilon`` (the noise), ``v_prediction`` (v = a_t eps - sigma_t x0, Salimans & Ho 2022) or ``sample``
(x0 itself). The training step, the few-step sampler and TDDScheduler convert the output once to the
pair (eps, x0); DDIM jumps and the consistency parameterisations then work on that pair unchanged.
With v: x0 = a_t x_t - sigma_t v and eps = sigma_t x_t + a_t v, which stay defined at zero terminal SNR
(a_T = 0), where eps prediction cannot give x0 (``check_prediction_type``).

A rectified-flow model (``flow``: FLUX, SD3) predicts the velocity v = eps - x0 of x_t = a_t x0 + sigma_t eps
with a_t = 1 - sigma_t (``diffusion.flow``): x0 = x_t - sigma_t v and eps = x_t + a_t v (ALGORITHM.md 8.1).
"""

from __future__ import annotations

import torch

from tdd_lightning.diffusion.ops import eps_to_x0, x0_to_eps

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # of a VP (DDPM-schedule) model
FLOW_PREDICTION = "flow"  # a rectified-flow model's velocity, with a FlowSchedule
ALL_PREDICTION_TYPES = (*PREDICTION_TYPES, FLOW_PREDICTION)


def to_eps_x0(
    output: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from the model ``output`` at x_t for ``prediction_type``."""
    if prediction_type == "epsilon":
        return output, eps_to_x0(x_t, output, a_t, sigma_t)
    if prediction_type == "v_prediction":
        return sigma_t * x_t + a_t * output, a_t * x_t - sigma_t * output
    if prediction_type == "sample":
        return x0_to_eps(x_t, output, a_t, sigma_t), output
    if prediction_type == FLOW_PREDICTION:  # a_t = 1 - sigma_t
        return x_t + a_t * output, x_t - sigma_t * output
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {ALL_PREDICTION_TYPES}")


def check_prediction_type(prediction_type: str, terminal_abar: float) -> None:
    """ValueError for an unknown type, or for eps prediction on a zero-terminal-SNR schedule (abar_T = 0:
    x0 = (x_T - sigma_T eps) / a_T is undefined at the first sampling step and at training's t = T-1)."""
    if prediction_type not in ALL_PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {ALL_PREDICTION_TYPES}")
    if prediction_type == "epsilon" and terminal_abar <= 0.0:
        raise ValueError(
            "prediction_type='epsilon' with a zero-terminal-SNR schedule (rescale_betas_zero_snr: abar at "
            "T-1 is 0) leaves x0 undefined at T-1: use a v_prediction (or sample) model with that schedule"
        )
