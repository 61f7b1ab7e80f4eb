"""Reading diffusers' attention layers: heads, keys and values, joint projections, rotary positions, probabilities.

The only module that reads the internals of diffusers' ``Attention`` (and FLUX's ``FluxAttention``).
Everything is computed as the layers' own processors compute it — ``AttnProcessor2_0`` for a UNet's
cross-attention, ``JointAttnProcessor2_0`` and FLUX's processor for MMDiT joint attention — so a
processor built on these functions changes only what it means to change.

- **cross** layers (:class:`~negprompt.layers.layout.AttentionLayout` kind ``"cross"``): queries of
  the image cells (B, Q, C), keys and values of a text context (B, L, D);
- **joint** layers (kind ``"joint"``): one softmax over [text; image] keys (Esser et al. 2024,
  Fig. 2); FLUX adds rotary positions and has single-stream layers whose tokens already hold
  [text; image]. What plays the part of a cross-attention map is the image-query × text-key block.

Heads: (B, L, H·d) ↔ (B, H, L, d) by :func:`split_heads` and :func:`merge_heads`, everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_processor import Attention

KeysValues = tuple[torch.Tensor, torch.Tensor]  # keys, values, each (B, H, L, d)
# What replaces softmax(qKᵀ/√d)V for a rule acting inside attention (NAG, VSF): (image queries
# (B, H, Q, d), positive text keys/values, negative text keys/values, image keys/values (joint layers:
# the image tokens are keys too; None for cross-attention)) → Z (B, Q, H·d). Optional keyword ``text_bias``:
# logit offsets (B, L) and (B, L⁻) of the positive's and the negative's text keys, relative to the image keys
# (a text mask's: −∞ leaves a key out; Chroma's), None: none.
Combine = Callable[[torch.Tensor, KeysValues, KeysValues, "KeysValues | None"], torch.Tensor]


# ---------------------------------------------------------------- heads


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H·d) → (B, H, L, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(z: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) → (B, L, H·d)."""
    return z.transpose(1, 2).flatten(2, 3)


def join_tokens(first: KeysValues, second: KeysValues) -> KeysValues:
    """Keys and values of two token sets along the token axis: [first; second]."""
    return torch.cat([first[0], second[0]], dim=2), torch.cat([first[1], second[1]], dim=2)


# ---------------------------------------------------------------- which layers


def is_cross_attention(module: Any) -> bool:
    """Whether ``module`` is a UNet cross-attention layer (queries of image cells on text keys)."""
    return isinstance(module, Attention) and bool(module.is_cross_attention)


def is_joint_attention(module: Any) -> bool:
    """Whether ``module`` is an MMDiT attention layer whose keys include text tokens: SD3's joint layers
    (``Attention`` with added projections; not SD3.5's image-only ``attn2``), FLUX's joint and
    single-stream layers (``FluxAttention``)."""
    name = type(module).__name__
    if name == "FluxAttention":
        return True
    return name == "Attention" and getattr(module, "add_k_proj", None) is not None


def attention_paths(denoiser: Any, kind: str) -> list[str]:
    """Module paths, in the denoiser's order, of the layers with text keys of a layout ``kind``."""
    test = {"cross": is_cross_attention, "joint": is_joint_attention}.get(kind)
    if test is None:
        return []
    return [path for path, module in denoiser.named_modules() if test(module)]


# ---------------------------------------------------------------- cross-attention


def cross_keys_values(attn: Attention, context: torch.Tensor) -> KeysValues:
    """A cross-attention layer's keys and values of a text context (B, L, D): each (B, H, L, d)."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = split_heads(attn.to_k(context), attn.heads), split_heads(attn.to_v(context), attn.heads)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


def output_projection(attn: Any, z: torch.Tensor) -> torch.Tensor:
    """The layer's output projection (linear, dropout) of attention outputs (B, Q, H·d)."""
    return attn.to_out[1](attn.to_out[0](z))


def cross_attention_output(
    attn: Attention,
    hidden_states: torch.Tensor,
    attend: Callable[[torch.Tensor], torch.Tensor],
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer's output for ``hidden_states`` (B, Q, C) or (B, C, h, w) with ``attend(query)`` — query
    (B, H, Q, d) → (B, Q, H·d) — in place of softmax(qKᵀ/√d)V; the rest (spatial and group norms,
    projections, output layers, residual) as ``AttnProcessor2_0`` computes it."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = split_heads(attn.to_q(hidden_states), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    out = output_projection(attn, attend(query).to(query.dtype))
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def cross_attention_probabilities(
    attn: Attention,
    hidden_states: torch.Tensor,
    context: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale) of the image queries over the context's keys, (B·heads, Q, L), with the
    layer's own pre-processing (``hidden_states`` (B, Q, C) or (B, C, h, w), ``context`` (B, L, D))."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch, length = context.shape[0], context.shape[1]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    return attn.get_attention_scores(query, key, attention_mask)


# ---------------------------------------------------------------- joint attention


def project(attn: Any, x: torch.Tensor, added: bool, values: bool = True) -> tuple[torch.Tensor, ...]:
    """Queries, keys (and values) (B, H, N, d) of tokens ``x`` (B, N, C) with a joint layer's projections
    and norms: the added (text) ones of a joint layer, or ``to_q``/``to_k``/``to_v`` (image tokens, and
    every token of a single-stream layer). The norms act on d only, as in the layers' processors."""
    if added:
        q, k = attn.add_q_proj(x), attn.add_k_proj(x)
        norm_q, norm_k = getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)
    else:
        q, k = attn.to_q(x), attn.to_k(x)
        norm_q, norm_k = attn.norm_q, attn.norm_k
    q, k = split_heads(q, attn.heads), split_heads(k, attn.heads)
    q, k = (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k))
    if not values:
        return q, k
    return q, k, split_heads((attn.add_v_proj if added else attn.to_v)(x), attn.heads)


def added_output_projection(attn: Any, z: torch.Tensor) -> torch.Tensor:
    """A joint layer's output projection of its text tokens (B, L, H·d) (``to_add_out``); unchanged
    where the layer has none (SD3's last block, FLUX's single-stream layers)."""
    to_add_out = getattr(attn, "to_add_out", None)
    return z if to_add_out is None else to_add_out(z.contiguous())


def rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Rotary positions on (B, H, N, d) (FLUX's ``apply_rotary_emb`` along the token axis); None: unchanged."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=2)


def logsumexp_over_keys(query: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """log Σ_k exp(q·k·scale) over all keys: (B, H, N, d), (B, H, K, d) float32 → (B, H, N).

    The fused attention kernels compute this beside their output without materialising the N × K
    scores (PyTorch's flash kernel on CPU, its memory-efficient kernel on CUDA); elsewhere, or if a
    kernel refuses the inputs, the scores are computed explicitly, ``chunk`` queries at a time."""
    try:
        if query.device.type == "cpu":
            kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return kernel(query, keys, keys, 0.0, False, scale=scale)[1]
        if query.device.type == "cuda":
            kernel = torch.ops.aten._scaled_dot_product_efficient_attention
            return kernel(query, keys, keys, None, True, scale=scale)[1][..., : query.shape[2]]
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    parts = [
        torch.logsumexp(query[:, :, i : i + chunk] @ keys.transpose(-1, -2) * scale, dim=-1)
        for i in range(0, query.shape[2], chunk)
    ]
    return torch.cat(parts, dim=2)


def attention_and_logsumexp(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ/√d + bias)·V and log Σ_k exp(q·k/√d + bias) over the keys: q (B, H, Q, d), K and V
    (B, H, K, d), ``bias`` broadcastable to (B, H, Q, K) or None → (B, H, Q, d) in q's dtype, (B, H, Q) float32.

    The fused kernels give the log-sum-exp beside their output (PyTorch's flash kernel on CPU, its
    memory-efficient kernel on CUDA); elsewhere, or if a kernel refuses the inputs, it is computed explicitly.
    With :func:`merge_attention` the attention over keys split in parts equals the attention over all of them."""
    scale = query.shape[-1] ** -0.5
    try:
        if query.device.type == "cpu":
            kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            mask = None if bias is None else bias.to(query.dtype)
            out, lse = kernel(query, keys, values, 0.0, False, attn_mask=mask, scale=scale)
            return out, _no_keys_left(lse.float(), bias)
        if query.device.type == "cuda":
            if bias is None and query.dtype in (torch.float16, torch.bfloat16):
                flash = _flash_attention_and_logsumexp(query, keys, values, scale)
                if flash is not None:
                    return flash
            kernel = torch.ops.aten._scaled_dot_product_efficient_attention
            mask = None if bias is None else bias.to(query.dtype).expand(*query.shape[:3], keys.shape[2])
            out, lse = kernel(query, keys, values, mask, True, scale=scale)[:2]
            return out, _no_keys_left(lse[..., : query.shape[2]].float(), bias)
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    scores = query.float() @ keys.float().transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    return ((scores - lse[..., None]).exp().nan_to_num(0.0) @ values.float()).to(query.dtype), lse


def _flash_attention_and_logsumexp(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """CUDA's flash kernel (half precision, no bias): the output and its log-sum-exp (B, H, Q) float32, as the
    fused attention of the layers' own processors computes them; None where it refuses the inputs (the
    memory-efficient kernel, slower on H100/H200, then does it). Not measured on a GPU yet: docs/gpu-cost.md."""
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, keys, values, 0.0, False, False, scale=scale
        )[:2]
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    if out.shape != query.shape[:3] + values.shape[3:] or lse.shape != query.shape[:3]:
        return None
    return out, lse.float()


def _no_keys_left(lse: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """−∞ where the bias masks every key (the fused kernels give 0 there), so the part weighs nothing when merged."""
    if bias is None:
        return lse
    return lse.masked_fill(torch.isneginf(bias).all(dim=-1).expand(lse.shape), float("-inf"))


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The attention over the union of disjoint key sets from each set's (output (B, H, Q, d), log-sum-exp
    (B, H, Q)) of :func:`attention_and_logsumexp`: Σ_i w_i·O_i with w_i = exp(lse_i − log Σ_j exp lse_j). A
    part with every key masked (lse −∞) weighs 0."""
    lse = torch.stack([part[1] for part in parts])  # (P, B, H, Q)
    weights = (lse - torch.logsumexp(lse, dim=0)).exp().nan_to_num(0.0)[..., None]
    merged = sum(
        torch.where(w > 0, w * out.float(), torch.zeros((), device=out.device)) for w, (out, _) in zip(weights, parts)
    )
    return merged.to(parts[0][0].dtype)


def text_key_probabilities(query: torch.Tensor, keys: torch.Tensor, text_length: int) -> torch.Tensor:
    """The text-key block of softmax(q·kᵀ/√d) over all keys, float32: queries (B, H, N, d), keys
    [text; image] (B, H, L + M, d) → (B, H, N, L), as exp(q·k_text/√d − log Σ_all exp(q·k/√d)) (no N × K
    matrix is kept)."""
    scale = query.shape[-1] ** -0.5
    query, keys = query.float().contiguous(), keys.float().contiguous()
    text_scores = query @ keys[:, :, :text_length].transpose(-1, -2) * scale
    return (text_scores - logsumexp_over_keys(query, keys, scale)[..., None]).exp()


def joint_attention_probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    text_length: int,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    text_block: bool = True,
) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of the image queries over all keys of a joint layer, float32.

    ``hidden_states``: the image tokens (B, N, C), or, for a single-stream layer
    (``encoder_hidden_states`` None), [text; image] tokens (B, L + N, C) with L = ``text_length``;
    ``rotary``: FLUX's (cos, sin) over [text; image] positions. Returns the text-key block
    (B·heads, N, L) in token order, or with ``text_block=False`` every key (B·heads, N, N + L) in
    [text; image] order (each row sums to 1).
    """
    if encoder_hidden_states is None:
        text, image = hidden_states[:, :text_length], hidden_states[:, text_length:]
        _, text_keys = project(attn, text, added=False, values=False)
    else:
        text, image = encoder_hidden_states, hidden_states
        _, text_keys = project(attn, text, added=True, values=False)
    query, image_keys = project(attn, image, added=False, values=False)
    keys = torch.cat([text_keys, image_keys], dim=2)  # [text; image], FLUX's order
    if rotary is not None:
        cos, sin = rotary
        keys, query = rotate(keys, rotary), rotate(query, (cos[text_length:], sin[text_length:]))
    batch, heads, tokens = query.shape[:3]
    if text_block:
        return text_key_probabilities(query, keys, text_length).reshape(batch * heads, tokens, text_length)
    scale = query.shape[-1] ** -0.5
    probabilities = (query.float() @ keys.float().transpose(-1, -2) * scale).softmax(dim=-1)
    return probabilities.reshape(batch * heads, tokens, -1)
