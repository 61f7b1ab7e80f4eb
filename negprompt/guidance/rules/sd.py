"""Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt."""

from __future__ import annotations

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, Rule, Tensor, single_negative


class StableDiffusionNegative(Rule):
    name = "sd"
    summary = "Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt"

    def check(self, guidance) -> None:
        super().check(guidance)
        single_negative(guidance, self.name, own_scale=False)

    def needs_unconditional(self, guidance, active: frozenset[str]) -> bool:
        # ε_∅ stands in for whichever of the two branches is outside its window.
        return not ({"positive", "negative"} <= active)

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        negatives = branches.negatives
        eps_neg = branches.eps(negatives[0]) if negatives else branches.unconditional
        return formulas.sd_negative(eps_neg, branches.eps("positive"), guidance.scale)


RULE = StableDiffusionNegative()
