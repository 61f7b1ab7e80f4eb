"""Adaptive Projected Guidance (Sadat et al. 2024): CFG with the update's part parallel to ε_y down-weighted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import (
    WEIGHS_A_TERM,
    BranchPredictions,
    GuidanceError,
    NegativeAsBase,
    RuleSettings,
    check_scale,
    option,
)

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class APGSettings(RuleSettings):
    """η, the norm threshold r and the momentum β (all 0: Sadat et al.'s plain projection)."""

    rule = "apg"
    eta: float = option(0.0, "APG weight η of the parallel part (1 = CFG)")
    norm_threshold: float = option(0.0, "APG norm threshold r (0: no clipping)", flag="threshold")
    momentum: float = option(0.0, "APG momentum β in (−1, 1); the paper uses negative values such as −0.5")

    def validate(self) -> None:
        super().validate()
        check_scale(self.eta, "apg_eta (η)", WEIGHS_A_TERM)
        if self.norm_threshold < 0:
            raise GuidanceError(f"apg_norm_threshold must be ≥ 0 (0 = no clipping), got {self.norm_threshold}")
        if not -1 < self.momentum < 1:
            raise GuidanceError(f"apg_momentum must be in (−1, 1), got {self.momentum}")


class AdaptiveProjected(NegativeAsBase):
    name = "apg"
    listing_order = 70
    summary = "Adaptive Projected Guidance: CFG with the update's part parallel to ε_y down-weighted"
    not_on_velocity = (
        "its norm threshold and momentum are set for ε and accumulate across σ, where v = (x_t − x̂₀)/σ rescales"
    )
    Settings = APGSettings

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        settings = guidance.settings
        guided, carried = formulas.projected(
            self.base(branches),
            branches.eps("positive"),
            guidance.scale,
            eta=settings.eta,
            norm_threshold=settings.norm_threshold,
            momentum=settings.momentum,
            previous=state.get("apg_previous"),
        )
        if settings.momentum:
            state["apg_previous"] = carried
        return guided


RULE = AdaptiveProjected()
