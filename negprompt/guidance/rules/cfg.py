"""Classifier-free guidance without a negative prompt, eq. (1) of the article."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, GuidanceError, Rule

if TYPE_CHECKING:
    from torch import Tensor


class CFG(Rule):
    name = "cfg"
    listing_order = 10
    summary = "classifier-free guidance, eq. (1); no negative prompt"

    def check(self, guidance) -> None:
        super().check(guidance)
        if guidance.negatives:
            raise GuidanceError("rule 'cfg' takes no negative prompt; use 'sd', 'dual' or 'weighted'")

    def needs_unconditional(self, guidance, active: frozenset[str]) -> bool:
        return guidance.scale != 1 or "positive" not in active  # s = 1: ε̂ = ε_y, one pass

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        if guidance.scale == 1:
            return branches.eps("positive")
        return formulas.cfg(branches.unconditional, branches.eps("positive"), guidance.scale)


RULE = CFG()
