"""Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, NegativeAsBase

if TYPE_CHECKING:
    from torch import Tensor


class StableDiffusionNegative(NegativeAsBase):
    name = "sd"
    listing_order = 20
    summary = "Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt"

    # At s = 1, eq. (9) is ε̂ = ε_y: the negative cannot act, and only the positive is evaluated (ε_∅
    # where the positive is outside its window). A guidance-distilled model runs so, one pass a step.

    def needs_unconditional(self, guidance, active: frozenset[str]) -> bool:
        if guidance.scale == 1:
            return "positive" not in active
        return super().needs_unconditional(guidance, active)

    def negatives_as_rows(self, guidance) -> bool:
        return guidance.scale != 1

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        if guidance.scale == 1:
            return branches.eps("positive")
        return formulas.sd_negative(self.base(branches), branches.eps("positive"), guidance.scale)


RULE = StableDiffusionNegative()
