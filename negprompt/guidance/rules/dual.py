"""Three branches with independent scales s⁺ and s⁻, eq. (8) of the article."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, Rule

if TYPE_CHECKING:
    from torch import Tensor


class DualScale(Rule):
    name = "dual"
    listing_order = 30
    summary = "three branches with independent scales s⁺, s⁻, eq. (8)"

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        eps_uncond = branches.unconditional
        guided = formulas.cfg(eps_uncond, branches.eps("positive"), guidance.scale)
        terms = guidance.terms
        for name in branches.negatives:
            if name in branches.active:
                guided = guided - guidance.negative_scale(terms[name]) * (branches.eps(name) - eps_uncond)
        return guided


RULE = DualScale()
