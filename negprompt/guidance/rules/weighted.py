"""Composable Diffusion (Liu et al. 2022): ε_∅ + Σ w_i(ε_i − ε_∅), any number of positives and negatives."""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, Rule

if TYPE_CHECKING:
    from torch import Tensor


class Weighted(Rule):
    name = "weighted"
    listing_order = 40
    summary = "Composable Diffusion: ε_∅ + Σ w_i(ε_i − ε_∅), any number of positives and negatives"

    def check(self, guidance) -> None:
        """Every prompt is welcome: several positives (AND) and negatives."""

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        names = [n for n in branches.terms if n in branches.active]
        weights = [term_weight(guidance, n) for n in names]
        return formulas.weighted_sum(branches.unconditional, [branches.predictions[n] for n in names], weights)


def term_weight(guidance, name: str) -> float:
    """w_i: s for the positive, its scale (else s) for extra positives, −s⁻ for negatives."""
    term = guidance.terms[name]
    if name == "positive":
        return float(guidance.scale)
    if name.startswith("positive"):
        return float(guidance.scale if term.scale is None else term.scale)
    return -guidance.negative_scale(term)


RULE = Weighted()
