"""Dynamic Negative Guidance (Koulischer et al., ICLR 2025): the negative's weight follows p(ỹ | x_t)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import (
    UNCONDITIONAL,
    WEIGHS_A_TERM,
    BranchPredictions,
    GuidanceError,
    Rule,
    RuleSettings,
    StepContext,
    check_scale,
    option,
    single_negative,
)

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class DNGSettings(RuleSettings):
    """λ and the tracked posterior's prior and clamp (defaults: the paper's examples)."""

    rule = "dng"
    strength: float = option(5.0, "DNG strength λ", flag="lambda")
    prior: float = option(0.01, "DNG prior p(negative) before the first step")
    p_min: float = option(1e-4, "DNG posterior lower clamp")
    p_max: float = option(0.8, "DNG posterior upper clamp, < 1")

    def validate(self) -> None:
        super().validate()
        if self.strength < 0:
            raise GuidanceError(f"dng_strength (λ) must be ≥ 0, got {self.strength}")
        check_scale(self.strength, "dng_strength (λ)", WEIGHS_A_TERM)
        if not 0 <= self.p_min < self.p_max < 1:
            raise GuidanceError(f"DNG clamp needs 0 ≤ p_min < p_max < 1, got p_min {self.p_min}, p_max {self.p_max}")
        if not self.p_min <= self.prior <= self.p_max:
            raise GuidanceError(f"dng_prior {self.prior} must lie in [p_min, p_max] = [{self.p_min}, {self.p_max}]")


class DynamicNegative(Rule):
    name = "dng"
    listing_order = 60
    summary = "Dynamic Negative Guidance: the negative's weight follows p(negative | x_t), tracked over steps"
    not_on_velocity = "its posterior update reads ε and the DDPM transition's variance, which a velocity-trained model does not define"
    Settings = DNGSettings

    def check(self, guidance) -> None:
        super().check(guidance)
        single_negative(guidance, self.name, own_scale=True)
        if not guidance.negatives:
            raise GuidanceError(f"rule {self.name!r} needs a negative prompt")

    def new_state(self, guidance, batch_size: int) -> dict[str, Tensor]:
        prior = guidance.settings.prior
        import torch  # here: the command line imports the rules, never torch

        return {"dng_log_odds": torch.full((batch_size,), math.log(prior / (1 - prior)), dtype=torch.float64)}

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        eps_uncond = branches.unconditional
        if "negative" not in branches.active:
            return formulas.cfg(eps_uncond, branches.eps("positive"), guidance.scale)
        term = guidance.terms["negative"]
        strength = guidance.settings.strength if term.scale is None else float(term.scale)
        return formulas.dynamic_negative(
            eps_uncond,
            branches.eps("positive"),
            branches.predictions["negative"],
            guidance.scale,
            strength,
            posterior(guidance.settings, state),
        )

    def update_state(
        self,
        guidance,
        state: dict[str, Tensor],
        predictions: Mapping[str, Tensor],
        guided: Tensor,
        context: StepContext,
    ) -> None:
        """DNG's Bayes update of p(ỹ | x) over the step (none after the last step)."""
        if "negative" not in predictions or UNCONDITIONAL not in predictions:
            return
        if context.step + 1 >= context.num_steps:
            return
        change = formulas.dng_log_odds_step(
            guided.double(),
            predictions[UNCONDITIONAL].double(),
            predictions["negative"].double(),
            context.alpha_bar,
            context.alpha_bar_next,
        )
        settings = guidance.settings
        low, high = (math.log(p / (1 - p)) if p > 0 else -math.inf for p in (settings.p_min, settings.p_max))
        state["dng_log_odds"] = (state["dng_log_odds"] + change.cpu()).clamp(low, high)


def posterior(settings: DNGSettings, state: Mapping[str, Tensor]) -> Tensor:
    """p(ỹ | x_t) per image, (B,), clamped to [p_min, p_max]."""
    import torch

    return torch.sigmoid(state["dng_log_odds"]).clamp(settings.p_min, settings.p_max)


RULE = DynamicNegative()
