"""CFG-Renormalization (Lumina-Image 2.0, Qin et al. 2025, arXiv 2503.21758): the negative prompt's CFG with
the guided prediction's norm capped at a multiple of the positive's.

ε̂ = ε_ỹ + s(ε_y − ε_ỹ) (rule ``sd``, eq. (9)), then, per image, ε̂ ← ε̂ · k‖ε_y‖/‖ε̂‖ where
‖ε̂‖ > k‖ε_y‖; the norms are taken over the whole prediction of an image (every channel and
position). At large scales it keeps the guided velocity from outgrowing the positive's, the
over-saturation CFG gives there. This is diffusers' ``ZImagePipeline`` with ``cfg_normalization=k``
(``True`` is k = 1; its guidance_scale g is s − 1) and Lumina2's ``cfg_normalization`` at k = 1.
Those pipelines apply it to the model's velocity output; a norm does not see the sign, so it acts
the same on negprompt's v = ε − x₀. At s = 1 only the positive is evaluated and nothing is capped,
as the pipelines skip CFG then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, GuidanceError, RuleSettings, option
from negprompt.guidance.rules.sd import StableDiffusionNegative

if TYPE_CHECKING:
    from torch import Tensor


def renormalized(guided: Tensor, eps_cond: Tensor, ratio: float) -> Tensor:
    """CFG-Renormalization: ``guided`` (B, C, H, W) scaled down, per image, to norm ratio·‖ε_y‖ where its
    norm ‖ε̂‖ (over C, H, W) is above that; unchanged elsewhere."""
    import torch

    norm = torch.linalg.vector_norm(guided.flatten(1), dim=1)
    cap = ratio * torch.linalg.vector_norm(eps_cond.flatten(1), dim=1)
    factor = torch.where(norm > cap, cap / norm, torch.ones_like(norm))
    return guided * factor.view(-1, *([1] * (guided.dim() - 1))).to(guided.dtype)


@dataclass(frozen=True)
class CFGRenormSettings(RuleSettings):
    """k: the multiple of the positive's norm the guided prediction may reach."""

    rule = "cfg-renorm"
    ratio: float = option(1.0, "cap ‖ε̂‖ at ratio·‖ε_y‖ per image (ZImagePipeline's cfg_normalization)")

    def validate(self) -> None:
        super().validate()
        if self.ratio <= 0:
            raise GuidanceError(
                f"cfg_renorm_ratio must be above 0 (1: the positive's norm), got {self.ratio}; for no cap use rule 'sd'"
            )


class CFGRenorm(StableDiffusionNegative):
    """Rule ``sd`` (the negative replaces ε_∅; one negative, one scale), its result renormalised."""

    name = "cfg-renorm"
    listing_order = 82
    summary = "CFG-Renormalization (Lumina-Image 2.0): rule sd with ‖ε̂‖ capped at k‖ε_y‖ per image"
    Settings = CFGRenormSettings

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        positive = branches.eps("positive")
        if guidance.scale == 1:
            return positive
        guided = formulas.sd_negative(self.base(branches), positive, guidance.scale)
        return renormalized(guided, positive, guidance.settings.ratio)


RULE = CFGRenorm()
