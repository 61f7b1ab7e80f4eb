"""Normalized Attention Guidance (NAG, Chen et al. 2025): the negative acts inside cross-attention."""

from __future__ import annotations

from dataclasses import dataclass

from negprompt.guidance.rules.base import (
    WEIGHS_A_TERM,
    GuidanceError,
    NegativeInAttention,
    RuleSettings,
    check_scale,
    option,
)
from negprompt.layers.layout import AttentionLayout


@dataclass(frozen=True)
class NAGSettings(RuleSettings):
    """φ, τ, α of the paper (defaults: its FLUX settings). φ = 1 or α = 0 leaves the positive unchanged."""

    rule = "nag"
    phi: float = option(5.0, "NAG extrapolation φ (1: off)", flag="scale")
    tau: float = option(2.5, "NAG clip τ of the L1 norm ratio")
    alpha: float = option(0.25, "NAG blend α of the guided and the positive output, in [0, 1]")

    def validate(self) -> None:
        super().validate()
        if self.phi < 0:
            raise GuidanceError(f"nag_phi (φ) must be ≥ 0, got {self.phi}")
        check_scale(self.phi, "nag_phi (φ)", WEIGHS_A_TERM)
        if self.tau <= 1:
            raise GuidanceError(
                f"nag_tau (τ) must be > 1 (a clip of the norm ratio below 1 shrinks the output), got {self.tau}"
            )
        if not 0 <= self.alpha <= 1:
            raise GuidanceError(f"nag_alpha (α) must be in [0, 1], got {self.alpha}")


class NormalizedAttentionGuidance(NegativeInAttention):
    name = "nag"
    listing_order = 90
    summary = "NAG (Chen et al. 2025): extrapolate each cross-attention output away from the negative's, L1-clipped"
    Settings = NAGSettings

    def neutral(self, settings: NAGSettings) -> bool:
        return settings.phi == 1 or settings.alpha == 0

    def combine_in_attention(self, settings: NAGSettings, layout: AttentionLayout):
        from negprompt.guidance.attention_processors import nag_combine

        return nag_combine(settings.phi, settings.tau, settings.alpha)


RULE = NormalizedAttentionGuidance()
