"""Schedule facts, computed in one place: how many denoiser calls a run makes, and ᾱ, σ at a timestep.

Noise level of a variance-preserving schedule: σ_t = √((1 − ᾱ_t)/ᾱ_t), so ᾱ_t = 1/(1 + σ_t²)
(Karras et al. 2022, eq. 1 with the VP scaling; Song et al. 2021). Schedulers that place steps
between the training timesteps (Euler-type, Heun, LMS with fractional timesteps) interpolate σ
linearly in t; so do these functions, for every caller.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from negprompt.sampling.schedulers import make_scheduler


def timesteps_of(scheduler_name: str, base: Any, steps: int) -> torch.Tensor:
    """The timesteps a fresh ``scheduler_name`` scheduler (schedule of ``base``) visits for ``steps``: (calls,)."""
    probe = make_scheduler(scheduler_name, base)
    probe.set_timesteps(steps)
    return probe.timesteps


def denoiser_calls(scheduler_name: str, base: Any, steps: int) -> int:
    """Denoiser (UNet) calls of a run: len(timesteps); e.g. PNDM makes N + 1 and Heun 2N − 1 for N steps."""
    return len(timesteps_of(scheduler_name, base, steps))


def sigmas_of(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training timestep t, float64: (T,)."""
    alphas = alphas_cumprod.double()
    return ((1 - alphas) / alphas).sqrt().numpy()


def sigma_at(alphas_cumprod: torch.Tensor, timestep: float | torch.Tensor) -> float:
    """σ at a (possibly fractional) timestep, interpolating σ linearly between training timesteps."""
    sigmas = sigmas_of(alphas_cumprod)
    return float(np.interp(float(timestep), np.arange(len(sigmas)), sigmas))


def alpha_bar_at(alphas_cumprod: torch.Tensor, timestep: float | torch.Tensor) -> float:
    """ᾱ at a (possibly fractional) timestep: ᾱ = 1/(1 + σ²) with σ from :func:`sigma_at`."""
    sigma = sigma_at(alphas_cumprod, timestep)
    return 1.0 / (1.0 + sigma**2)
