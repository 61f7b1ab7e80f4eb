"""Qwen-Image's true CFG: the negative prompt's CFG, renormalised per image token to the positive's norm.

ε̂ = comb · ‖ε_y‖/‖comb‖ with comb = ε_ỹ + s(ε_y − ε_ỹ) (rule ``sd``, eq. (9)), the norms taken per
image token of the denoiser: over the C channels of its p×p latent cells (p: the model's
``AttentionLayout.patch``, 2 for Qwen-Image), so every token keeps the positive's norm and only its
direction is guided. This is diffusers' ``QwenImagePipeline`` (added with Qwen-Image's release, diffusers
PR #12055) with ``negative_prompt`` and ``true_cfg_scale`` s > 1, which takes the norms over the last axis
of its packed prediction (B, h/2·w/2, 4C). Applied to the prediction the model makes (velocities
there). At s = 1 only the positive is evaluated, as the pipeline runs no CFG then; a negative outside its
window is replaced by ε_∅, as in rule ``sd``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from negprompt.guidance import formulas
from negprompt.guidance.rules.base import BranchPredictions, GuidanceError
from negprompt.guidance.rules.sd import StableDiffusionNegative

if TYPE_CHECKING:
    from torch import Tensor


def token_norms(prediction: Tensor, patch: int) -> Tensor:
    """‖·‖ of each image token of ``prediction`` (B, C, H, W): over C and a patch × patch block of cells,
    (B, 1, H/patch, 1, W/patch, 1) to broadcast against the blocked view (B, C, H/patch, patch, W/patch, patch)."""
    import torch

    batch, channels, height, width = prediction.shape
    blocks = prediction.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return torch.linalg.vector_norm(blocks, dim=(1, 3, 5), keepdim=True)


def token_renormalized(guided: Tensor, eps_cond: Tensor, patch: int) -> Tensor:
    """``guided`` (B, C, H, W) rescaled per image token to the norm of ``eps_cond``'s token there:
    ε̂ · ‖ε_y‖/‖ε̂‖, as ``QwenImagePipeline`` writes it (no guard: a zero token gives NaN there too)."""
    batch, channels, height, width = guided.shape
    blocks = guided.reshape(batch, channels, height // patch, patch, width // patch, patch)
    scaled = blocks * (token_norms(eps_cond, patch) / token_norms(guided, patch))
    return scaled.reshape(guided.shape)


class TokenRenorm(StableDiffusionNegative):
    """Rule ``sd`` (the negative replaces ε_∅; one negative, one scale), each image token renormalised."""

    name = "token-renorm"
    listing_order = 85
    summary = "Qwen-Image's true CFG: rule sd, each image token rescaled to the positive's norm ‖ε_y‖"

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        positive = branches.eps("positive")
        if guidance.scale == 1:
            return positive
        if branches.attention is None:
            raise GuidanceError(f"rule {self.name!r} works per image token: give the model's attention layout")
        guided = formulas.sd_negative(self.base(branches), positive, guidance.scale)
        return token_renormalized(guided, positive, branches.attention.patch)


RULE = TokenRenorm()
