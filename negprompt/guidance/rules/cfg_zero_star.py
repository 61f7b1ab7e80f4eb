"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886): CFG with an optimised scale for the base, and zeroed first steps.

Per sample, the base prediction (the negative's where one is active, else ε_∅) is scaled by
s* = ⟨ε_y, ε_base⟩ / ‖ε_base‖² (eq. 7 of the paper: the projection of ε_y on ε_base), then
ε̂ = s*·ε_base + s·(ε_y − s*·ε_base). The first ``zero_steps`` steps output ε̂ = 0 ("zero-init",
Sec. 4.2 of the paper; 1 is the paper's and diffusers' default). The paper targets flow matching,
where a zero velocity leaves the sample where it is; on ε-prediction models a zero ε̂ means the
step does no denoising (x̂₀ = x_t/√ᾱ_t): set ``zero_steps`` to 0 to keep only the optimised scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from negprompt.guidance.rules.base import (
    BranchPredictions,
    GuidanceError,
    NegativeAsBase,
    RuleSettings,
    option,
)

if TYPE_CHECKING:
    from torch import Tensor


def optimized_scale(eps_cond: Tensor, eps_base: Tensor, eps: float = 1e-8) -> Tensor:
    """s* = ⟨ε_y, ε_base⟩ / (‖ε_base‖² + eps) per sample, shaped (B, 1, …, 1) for broadcasting."""
    dot = (eps_cond * eps_base).flatten(1).sum(dim=1)
    norm = eps_base.pow(2).flatten(1).sum(dim=1) + eps
    return (dot / norm).view(-1, *([1] * (eps_cond.dim() - 1)))


def cfg_zero_star(eps_base: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """CFG-Zero*'s guided prediction: ε̂ = s*·ε_base + s·(ε_y − s*·ε_base), (B, C, H, W)."""
    base = optimized_scale(eps_cond, eps_base).to(eps_cond.dtype) * eps_base
    return base + scale * (eps_cond - base)


@dataclass(frozen=True)
class CFGZeroStarSettings(RuleSettings):
    """How many first steps are zeroed."""

    rule = "cfg-zero-star"
    zero_steps: int = option(1, "CFG-Zero*: the first N steps output zero (0: off)")

    def validate(self) -> None:
        super().validate()
        if self.zero_steps < 0:
            raise GuidanceError(f"cfg_zero_star_zero_steps must be ≥ 0, got {self.zero_steps}")


class CFGZeroStar(NegativeAsBase):
    """The negative, when given, is the base (it replaces ε_∅ as in rule ``sd``)."""

    name = "cfg-zero-star"
    listing_order = 80
    summary = "CFG-Zero*: CFG with the base scaled by s* = ⟨ε_y, ε_base⟩/‖ε_base‖², first steps zeroed"
    Settings = CFGZeroStarSettings

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        eps_cond = branches.eps("positive")
        if branches.step < guidance.settings.zero_steps:
            return eps_cond.new_zeros(eps_cond.shape)
        return cfg_zero_star(self.base(branches), eps_cond, guidance.scale)


RULE = CFGZeroStar()
