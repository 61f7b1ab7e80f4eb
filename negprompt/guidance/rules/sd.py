"""Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, NegativeAsBase

if TYPE_CHECKING:
    from torch import Tensor


class StableDiffusionNegative(NegativeAsBase):
    name = "sd"
    summary = "Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt"

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        return formulas.sd_negative(self.base(branches), branches.eps("positive"), guidance.scale)


RULE = StableDiffusionNegative()
