"""Schedule facts, computed in one place: how many denoiser calls a run makes, and ᾱ, σ at a timestep.

Noise level of a variance-preserving schedule: σ_t = √((1 − ᾱ_t)/ᾱ_t), so ᾱ_t = 1/(1 + σ_t²)
(Karras et al. 2022, eq. 1 with the VP scaling; Song et al. 2021). Schedulers that place steps
between the training timesteps (Euler-type, Heun, LMS with fractional timesteps) interpolate σ
linearly in t; so do these functions, for every caller.

Flow matching (SD3, FLUX; Lipman et al. 2023, Esser et al. 2024 eq. 3) noises as x_t = (1 − σ)x₀ + σε
with σ = t / T (T = 1000 training timesteps). Dividing by (1 − σ) gives the VP form with
σ_VP = σ/(1 − σ), so the same ᾱ = 1/(1 + σ_VP²) = (1 − σ)²/((1 − σ)² + σ²) serves the rules and
windows that read noise levels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from negprompt.sampling.schedulers import is_flow_matching, make_scheduler


def timesteps_of(scheduler_name: str, base: Any, steps: int, **settings: Any) -> torch.Tensor:
    """The timesteps a fresh ``scheduler_name`` scheduler (schedule of ``base``) visits for ``steps``: (calls,).

    ``settings``: further ``set_timesteps`` keywords, the family's (``ModelFamily.timestep_settings``);
    a flow-matching scheduler with dynamic shifting given none gets μ = 0 here, which changes the
    timesteps' values but not their count."""
    probe = make_scheduler(scheduler_name, base)
    if is_flow_matching(probe) and probe.config.get("use_dynamic_shifting") and "mu" not in settings:
        settings = {**settings, "mu": 0.0}
    probe.set_timesteps(steps, **settings)
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


def flow_sigma(scheduler: Any, timestep: float | torch.Tensor) -> float:
    """σ = t / T of a flow-matching scheduler: the weight of the noise in x_t = (1 − σ)x₀ + σε."""
    return float(timestep) / float(scheduler.config.num_train_timesteps)


def noise_level(scheduler: Any, timestep: float | torch.Tensor) -> float:
    """σ_VP = √((1 − ᾱ)/ᾱ) at ``timestep``: from the schedule's ᾱ, or σ/(1 − σ) for flow matching (inf at σ = 1)."""
    if is_flow_matching(scheduler):
        sigma = flow_sigma(scheduler, timestep)
        return float("inf") if sigma >= 1 else sigma / (1 - sigma)
    return sigma_at(scheduler.alphas_cumprod, timestep)


def alpha_bar_of(scheduler: Any, timestep: float | torch.Tensor) -> float:
    """ᾱ at ``timestep`` for any scheduler: :func:`alpha_bar_at` on its schedule, or (1 − σ)²/((1 − σ)² + σ²)
    for flow matching."""
    if is_flow_matching(scheduler):
        sigma = flow_sigma(scheduler, timestep)
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    return alpha_bar_at(scheduler.alphas_cumprod, timestep)


def alpha_bar_at(alphas_cumprod: torch.Tensor, timestep: float | torch.Tensor) -> float:
    """ᾱ at a (possibly fractional) timestep: ᾱ = 1/(1 + σ²) with σ from :func:`sigma_at`."""
    sigma = sigma_at(alphas_cumprod, timestep)
    return 1.0 / (1.0 + sigma**2)
