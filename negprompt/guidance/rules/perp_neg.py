"""Perp-Neg (Armandpour et al. 2023): subtract only the part of each negative orthogonal to the positive."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, GuidanceError, Rule

if TYPE_CHECKING:
    from torch import Tensor


class PerpNeg(Rule):
    name = "perp-neg"
    listing_order = 50
    summary = "Perp-Neg: subtract only the part of each negative orthogonal to the positive"

    def check(self, guidance) -> None:
        super().check(guidance)
        if not guidance.negatives:
            raise GuidanceError(f"rule {self.name!r} needs a negative prompt")

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        terms = guidance.terms
        live = [n for n in branches.negatives if n in branches.active]
        weights = [1.0 if terms[n].scale is None else float(terms[n].scale) for n in live]
        return formulas.perp_neg(
            branches.unconditional,
            branches.eps("positive"),
            [branches.predictions[n] for n in live],
            guidance.scale,
            weights,
        )


RULE = PerpNeg()
