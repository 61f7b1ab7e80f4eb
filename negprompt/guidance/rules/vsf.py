"""Value Sign Flip (VSF, 2025): the negative's tokens join the keys with their values negated."""

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
class VSFSettings(RuleSettings):
    """λ, the flipped values' scale (0: off, nothing appended), and b, a bias on the negative keys' logits."""

    rule = "vsf"
    scale: float = option(4.0, "VSF scale λ of the negative's flipped values (0: off)")
    offset: float = option(0.0, "VSF bias b added to the negative keys' attention logits")

    def validate(self) -> None:
        super().validate()
        if self.scale < 0:
            raise GuidanceError(f"vsf_scale (λ) must be ≥ 0, got {self.scale}")
        check_scale(self.scale, "vsf_scale (λ)", WEIGHS_A_TERM)


class ValueSignFlip(NegativeInAttention):
    name = "vsf"
    listing_order = 100
    summary = "VSF (2025): the negative's tokens join each cross-attention with their values' sign flipped"
    Settings = VSFSettings

    def neutral(self, settings: VSFSettings) -> bool:
        return settings.scale == 0

    def combine_in_attention(self, settings: VSFSettings, layout: AttentionLayout):
        from negprompt.guidance.attention_processors import vsf_combine

        return vsf_combine(settings.scale, settings.offset, layout.text_start_tokens)


RULE = ValueSignFlip()
