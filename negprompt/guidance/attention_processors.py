"""Attention processors for rules that act inside cross-attention layers (NAG, VSF).

For one denoiser call, :func:`negative_in_attention` installs on every cross-attention layer (keyed by
its module path) a processor that recomputes the positive branch's rows with the negative's context,
and restores the layers' processors on exit, also after an error. Other rows (e.g. ∅ rows of a CFG
run) go through the layer's own processor unchanged. The attention is computed as diffusers'
``AttnProcessor2_0`` computes it (same projections, norms and output layers), so only the formula of
the rule differs. Imports torch: rules import this module in ``prepare`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.guidance import formulas

# (attn, query (B, H, Q, d), keys, values (B, H, L, d), negative keys, values (B, H, L⁻, d)) → Z (B, Q, H·d)
Combine = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, L, H·d) → (B, H, L, d)."""
    batch = x.shape[0]
    return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def _merge(z: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, d) → (B, Q, H·d)."""
    batch, heads, queries, dim = z.shape
    return z.transpose(1, 2).reshape(batch, queries, heads * dim)


def keys_values(attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values of a text context (B, L, D): each (B, H, L, d)."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = _heads(attn, attn.to_k(context)), _heads(attn, attn.to_v(context))
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def cross_attention(
    attn: Any,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    negative: torch.Tensor,
    combine: Combine,
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output for ``hidden_states`` with ``combine`` in place of softmax(qKᵀ/√d)V, as
    ``AttnProcessor2_0`` computes the rest (spatial and group norms, projections, output layers, residual)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = _heads(attn, attn.to_q(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    key, value = keys_values(attn, context)
    key_negative, value_negative = keys_values(attn, negative)
    out = combine(attn, query, key, value, key_negative, value_negative).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def nag_combine(phi: float, tau: float, alpha: float) -> Combine:
    """Z⁺ and Z⁻ in one attention call, then :func:`negprompt.guidance.formulas.nag`."""

    def combine(attn, query, key, value, key_negative, value_negative):
        both = F.scaled_dot_product_attention(
            torch.cat([query, query]), torch.cat([key, key_negative]), torch.cat([value, value_negative])
        )
        positive, negative = _merge(both).chunk(2)
        return formulas.nag(positive, negative, phi, tau, alpha)

    return combine


def vsf_combine(scale: float, offset: float) -> Combine:
    """:func:`negprompt.guidance.formulas.vsf_attention`; the negative's start token (CLIP's attention
    sink) is left out of the appended keys."""

    def combine(attn, query, key, value, key_negative, value_negative):
        z = formulas.vsf_attention(query, key, value, key_negative[:, :, 1:], value_negative[:, :, 1:], scale, offset)
        return _merge(z)

    return combine


class NegativeAttentionProcessor:
    """A cross-attention layer's processor for one call: rows ``rows`` (the positive branch's) are
    recomputed with ``combine`` and the negative context (B, L⁻, D); others go through ``original``.

    An ``original`` that observes attention (``observes_attention``, e.g. attention capture) still sees
    the whole batch and, through ``observe_context``, the positive rows' attention on the negative.
    """

    def __init__(
        self, original: Any, rows: slice, negative: torch.Tensor, combine: Combine, branch: str = "negative"
    ) -> None:
        self.original, self.rows, self.negative, self.combine = original, rows, negative, combine
        self.branch = branch  # the negative's branch name, for observers

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None:  # self-attention, or a masked layer
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows, whole = self.rows, self.rows == slice(0, hidden_states.shape[0])
        guided = cross_attention(
            attn,
            hidden_states[rows],
            encoder_hidden_states[rows],
            self.negative,
            self.combine,
            None if temb is None else temb[rows],
        )
        observer = self.original if getattr(self.original, "observes_attention", False) else None
        if observer is not None:  # e.g. attention capture: the negative's maps as a branch of their own
            observer.observe_context(attn, hidden_states[rows], self.negative, self.branch)
        if whole and observer is None:  # one pass per step (scale 1): only the positive's rows
            return guided
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out = out.clone()
        out[rows] = guided
        return out


def cross_attention_paths(unet: Any) -> list[str]:
    """Module paths of the UNet's cross-attention layers."""
    return [
        key.removesuffix(".processor")
        for key in getattr(unet, "attn_processors", {})
        if getattr(unet.get_submodule(key.removesuffix(".processor")), "is_cross_attention", False)
    ]


@contextmanager
def negative_in_attention(
    unet: Any, rows: slice, negative: torch.Tensor, combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """Installs :class:`NegativeAttentionProcessor` on every cross-attention layer for one call and
    restores the processors found on exit (also on error)."""
    originals = dict(unet.attn_processors)
    wanted = set(cross_attention_paths(unet))
    unet.set_attn_processor(
        {
            key: NegativeAttentionProcessor(processor, rows, negative, combine, branch)
            if key.removesuffix(".processor") in wanted
            else processor
            for key, processor in originals.items()
        }
    )
    try:
        yield
    finally:
        unet.set_attn_processor(originals)
