"""Guidance rules: pure functions from branch predictions to one guided prediction.

Notation (the article's, see docs/guidance.md): ε_∅ the unconditional prediction (empty prompt), ε_y the positive
prompt's, ε_ỹ the negative prompt's. Every function takes tensors of one shape (B, C, H, W) and
returns a tensor of that shape and dtype; none mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def cfg(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, eq. (1): ε̂ = ε_∅ + s·(ε_y − ε_∅)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sd_negative(eps_neg: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Stable Diffusion's negative prompt, eq. (2)/(9): ε̂ = ε_ỹ + s·(ε_y − ε_ỹ).

    The negative prediction takes the place of the unconditional one in eq. (1); this is what
    diffusers' StableDiffusionPipeline computes when given ``negative_prompt``.
    """
    return eps_neg + scale * (eps_cond - eps_neg)


def dual_scale(eps_uncond: Tensor, eps_cond: Tensor, eps_neg: Tensor, scale_pos: float, scale_neg: float) -> Tensor:
    """Three branches, two scales, eq. (8): ε̂ = ε_∅ + s⁺(ε_y − ε_∅) − s⁻(ε_ỹ − ε_∅).

    With s⁻ = s⁺ − 1 the ε_∅ terms cancel and this equals :func:`sd_negative`, eq. (9).
    """
    return eps_uncond + scale_pos * (eps_cond - eps_uncond) - scale_neg * (eps_neg - eps_uncond)


def weighted_sum(eps_uncond: Tensor, eps_terms: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Composable Diffusion's weighted form: ε̂ = ε_∅ + Σ_i w_i (ε_i − ε_∅).

    w_i > 0 for positive prompts, w_i < 0 for negative ones; no terms gives ε_∅.
    """
    if len(eps_terms) != len(weights):
        raise ValueError(f"got {len(eps_terms)} predictions but {len(weights)} weights; give one weight each")
    guided = eps_uncond.clone()
    for eps, weight in zip(eps_terms, weights):
        guided = guided + weight * (eps - eps_uncond)
    return guided


# ---------------------------------------------------------------- beyond the article (papers cited per function; docs/guidance.md)


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ per sample over every non-batch dimension, shaped (B, 1, …, 1) for broadcasting."""
    dot = (a * b).flatten(1).sum(dim=1)
    return dot.view(-1, *([1] * (a.dim() - 1)))


def perpendicular(delta: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """The part of ``delta`` orthogonal to ``reference``, per sample: Δ − (⟨Δ,r⟩/‖r‖²)·r."""
    return delta - _per_sample_dot(delta, reference) / _per_sample_dot(reference, reference).clamp_min(eps) * reference


def perp_neg(
    eps_uncond: Tensor, eps_cond: Tensor, eps_negatives: Sequence[Tensor], scale: float, weights: Sequence[float]
) -> Tensor:
    """Perp-Neg (Armandpour et al. 2023): ε̂ = ε_∅ + s[Δ₀ − Σ_i w_i Δ_i^⊥].

    Δ₀ = ε_y − ε_∅, Δ_i = ε_ỹi − ε_∅, and Δ_i^⊥ its part orthogonal to Δ₀, per sample (the batched
    form; the official code projects over the whole batch at once). A negative whose Δ_i is
    parallel to Δ₀ removes nothing of the positive.
    """
    if len(eps_negatives) != len(weights):
        raise ValueError(f"got {len(eps_negatives)} negative predictions but {len(weights)} weights")
    delta_pos = eps_cond - eps_uncond
    update = delta_pos
    for eps_neg, weight in zip(eps_negatives, weights):
        update = update - weight * perpendicular(eps_neg - eps_uncond, delta_pos)
    return eps_uncond + scale * update


def per_sample_std(x: Tensor) -> Tensor:
    """Standard deviation per sample over every non-batch dimension, shaped (B, 1, …, 1)."""
    return x.flatten(1).std(dim=1).view(-1, *([1] * (x.dim() - 1)))


def rescale(guided: Tensor, eps_cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15–16): ε_r = ε̂·σ(ε_y)/σ(ε̂); φ·ε_r + (1 − φ)·ε̂.

    σ is the per-sample standard deviation; φ = 0 returns ``guided`` unchanged.
    """
    if phi == 0:
        return guided
    rescaled = guided * per_sample_std(eps_cond) / per_sample_std(guided).clamp_min(1e-12)
    return phi * rescaled + (1 - phi) * guided


def dynamic_negative(
    eps_uncond: Tensor, eps_cond: Tensor, eps_neg: Tensor, scale: float, strength: float, posterior: Tensor
) -> Tensor:
    """Dynamic Negative Guidance (Koulischer et al., ICLR 2025) on top of CFG:

    ε̂ = ε_∅ + s(ε_y − ε_∅) − λ·p/(1 − p)·(ε_ỹ − ε_∅), with p = p(ỹ | x_t) per sample, shape (B,).
    """
    odds = (posterior / (1 - posterior)).view(-1, *([1] * (eps_cond.dim() - 1))).to(eps_cond.dtype)
    return cfg(eps_uncond, eps_cond, scale) - strength * odds * (eps_neg - eps_uncond)


def dng_log_odds_step(
    guided: Tensor, eps_uncond: Tensor, eps_neg: Tensor, alpha_bar: float, alpha_bar_next: float
) -> Tensor:
    """Change of log p(ỹ|x)/(1 − p(ỹ|x)) over one step from t to t' (DNG's Bayes update), (B,).

    Under each branch c the reverse step is Gaussian, N(μ_c, σ²) with the DDPM posterior between
    ᾱ_t and ᾱ_t'. The sample taken follows the guided mean, so x_t' − μ_c = b(ε̂ − ε_c) and

        Δ log-odds = b²/(2σ²) · (‖ε̂ − ε_∅‖² − ‖ε̂ − ε_ỹ‖²),   b²/σ² = ᾱ_t'(1 − ᾱ_t/ᾱ_t') / (ᾱ_t(1 − ᾱ_t')).

    (The sampler's own noise is left out: the update is the same for deterministic samplers.)
    """
    beta = 1 - alpha_bar / alpha_bar_next
    factor = alpha_bar_next * beta / (alpha_bar * max(1 - alpha_bar_next, 1e-8))
    far = (guided - eps_uncond).flatten(1).pow(2).sum(dim=1)
    near = (guided - eps_neg).flatten(1).pow(2).sum(dim=1)
    return 0.5 * factor * (far - near)


def projected(
    eps_base: Tensor,
    eps_cond: Tensor,
    scale: float,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    momentum: float = 0.0,
    previous: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Adaptive Projected Guidance (Sadat et al. 2024), on ε: returns (ε̂, the Δ to carry as momentum).

    Δ = ε_y − ε_base (+ β·Δ_previous); clipped to norm r per sample (r = 0: no clipping); split
    into Δ∥ (parallel to ε_y) and Δ⊥; ε̂ = ε_y + (s − 1)(Δ⊥ + η·Δ∥). η = 1, r = 0, β = 0 is CFG.
    """
    delta = eps_cond - eps_base
    if momentum and previous is not None:
        delta = delta + momentum * previous
    carried = delta
    if norm_threshold > 0:
        norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
        import torch  # here, not at the top: the command line imports the rules, never torch

        delta = delta * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    parallel = _per_sample_dot(delta, eps_cond) / _per_sample_dot(eps_cond, eps_cond).clamp_min(1e-12) * eps_cond
    orthogonal = delta - parallel
    return eps_cond + (scale - 1) * (orthogonal + eta * parallel), carried


# ---------------------------------------------------------------- inside attention layers
# These act on one cross-attention layer's tensors, not on predictions: Z (B, Q, C) attention outputs
# before the output projection; q (B, heads, Q, d), k and v (B, heads, L, d).


def nag(z_positive: Tensor, z_negative: Tensor, phi: float, tau: float, alpha: float) -> Tensor:
    """Normalized Attention Guidance (Chen et al. 2025, §3), per token of one cross-attention layer:

    Z̃ = φZ⁺ − (φ − 1)Z⁻ (extrapolation away from the negative context's output), then the per-token L1
    norm ratio r = ‖Z̃‖₁/‖Z⁺‖₁ is clipped to τ (Z̃ ← Z̃·min(r, τ)/r), then Ẑ = αZ̃ + (1 − α)Z⁺.
    φ = 1 or α = 0 gives Z⁺. Shapes (B, Q, C) → (B, Q, C).
    """
    extrapolated = phi * z_positive - (phi - 1.0) * z_negative
    norm_positive = z_positive.abs().sum(dim=-1, keepdim=True)
    norm_extrapolated = extrapolated.abs().sum(dim=-1, keepdim=True)
    ratio = norm_extrapolated / norm_positive
    clipped = ratio.clamp(max=tau)
    normalized = extrapolated * (clipped / ratio).nan_to_num(nan=1.0, posinf=1.0)
    return alpha * normalized + (1.0 - alpha) * z_positive


def vsf_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_negative: Tensor,
    value_negative: Tensor,
    scale: float,
    offset: float,
    key_bias: Tensor | None = None,
) -> Tensor:
    """Value Sign Flip (VSF, 2025): the negative's tokens join the keys, their values with the sign flipped
    and scaled by λ, in one attention pass:

    Z = softmax([q·Kᵀ/√d, q·K⁻ᵀ/√d + b]) · [V; −λV⁻],

    with b (``offset``) added to the negative keys' scaled logits. Shapes: q (B, H, Q, d), K/V (B, H, L, d),
    K⁻/V⁻ (B, H, L⁻, d) → Z (B, H, Q, d). ``key_bias``: further logit offsets of the keys [K; K⁻], broadcastable
    to (B, H, Q, L + L⁻) (a text mask's: −∞ leaves a key out), or None.
    """
    import torch
    import torch.nn.functional as F

    keys = torch.cat([key, key_negative], dim=2)
    values = torch.cat([value, -scale * value_negative], dim=2)
    bias = None
    if offset:
        bias = torch.zeros(1, key.shape[2] + key_negative.shape[2], dtype=query.dtype, device=query.device)
        bias[:, key.shape[2] :] = offset  # (1, L + L⁻), broadcast over queries: added after the 1/√d scale
    if key_bias is not None:
        bias = key_bias.to(query.dtype) if bias is None else key_bias.to(query.dtype) + bias
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias)
