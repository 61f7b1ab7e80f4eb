"""Guidance rules: pure functions from branch predictions to one guided prediction.

Notation (../shared/MISSION.md): ε_∅ the unconditional prediction (empty prompt), ε_y the positive
prompt's, ε_ỹ the negative prompt's. Every function takes tensors of one shape (B, C, H, W) and
returns a tensor of that shape and dtype; none mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def cfg(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, eq. (1): ε̂ = ε_∅ + s·(ε_y − ε_∅)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sd_negative(eps_neg: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Stable Diffusion's negative prompt, eq. (2)/(9): ε̂ = ε_ỹ + s·(ε_y − ε_ỹ).

    The negative prediction takes the place of the unconditional one in eq. (1); this is what
    diffusers' StableDiffusionPipeline computes when given ``negative_prompt``.
    """
    return eps_neg + scale * (eps_cond - eps_neg)


def dual_scale(eps_uncond: Tensor, eps_cond: Tensor, eps_neg: Tensor, scale_pos: float, scale_neg: float) -> Tensor:
    """Three branches, two scales, eq. (8): ε̂ = ε_∅ + s⁺(ε_y − ε_∅) − s⁻(ε_ỹ − ε_∅).

    With s⁻ = s⁺ − 1 the ε_∅ terms cancel and this equals :func:`sd_negative`, eq. (9).
    """
    return eps_uncond + scale_pos * (eps_cond - eps_uncond) - scale_neg * (eps_neg - eps_uncond)


def weighted_sum(eps_uncond: Tensor, eps_terms: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Composable Diffusion's weighted form: ε̂ = ε_∅ + Σ_i w_i (ε_i − ε_∅).

    w_i > 0 for positive prompts, w_i < 0 for negative ones; no terms gives ε_∅.
    """
    if len(eps_terms) != len(weights):
        raise ValueError(f"got {len(eps_terms)} predictions but {len(weights)} weights; give one weight each")
    guided = eps_uncond.clone()
    for eps, weight in zip(eps_terms, weights):
        guided = guided + weight * (eps - eps_uncond)
    return guided
