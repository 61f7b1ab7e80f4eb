"""Attention maps of MMDiT transformers (SD3, FLUX): image queries on text keys inside joint attention.

An MMDiT block attends over one sequence of image and text tokens together (Esser et al. 2024,
Fig. 2): softmax(q·kᵀ/√d) runs over all keys, image and text. What plays the part of a UNet's
cross-attention map is the image-query × text-key block of that softmax: (B·heads, N_img, L),
each row summing with its image-key block to 1. Layers, keyed by module path:

- SD3 ``transformer_blocks.N.attn``: joint attention, keys [image; text] (``JointAttnProcessor2_0``);
  SD3.5's ``attn2`` (image self-attention) has no text keys and is skipped;
- FLUX ``transformer_blocks.N.attn``: joint attention, keys [text; image], rotary positions;
- FLUX ``single_transformer_blocks.N.attn``: one stream that already holds [text; image] tokens.

:class:`JointCaptureProcessor` lets the layer's own processor compute the output (images stay
bit-identical) and computes the probabilities beside it with the layer's projections, norms and
rotary embeddings.
"""

from __future__ import annotations

from typing import Any

import torch

from negprompt.guidance.joint_attention_processors import is_joint_attention


def joint_attention_paths(transformer: Any) -> list[str]:
    """Module paths of every attention layer of an SD3 or FLUX transformer with text keys."""
    return [path for path, module in transformer.named_modules() if is_joint_attention(module)]


def _rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """FLUX's rotary embedding on (B, N, H, d), positions along N (as ``apply_rotary_emb`` with real pairs)."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


def _logsumexp(query: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
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
    flux = type(attn).__name__ == "FluxAttention"
    heads = attn.heads
    if encoder_hidden_states is None:
        text, image = hidden_states[:, :text_length], hidden_states[:, text_length:]
        text_keys = attn.to_k(text)
    else:
        text, image = encoder_hidden_states, hidden_states
        text_keys = attn.add_k_proj(text)
    batch, tokens = image.shape[0], image.shape[1]

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, H·d) → (B, N, H, d)
        return x.view(x.shape[0], x.shape[1], heads, -1)

    # The norms act on the last axis (d) only, so the (B, N, H, d) layout gives the processors' values.
    query, key, text_keys = split(attn.to_q(image)), split(attn.to_k(image)), split(text_keys)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    norm_text = attn.norm_k if encoder_hidden_states is None else getattr(attn, "norm_added_k", None)
    if norm_text is not None:
        text_keys = norm_text(text_keys)
    keys = torch.cat([text_keys, key], dim=1)  # [text; image], FLUX's order
    if flux and rotary is not None:
        cos, sin = rotary
        keys = _rotate(keys, rotary)
        query = _rotate(query, (cos[text_length:], sin[text_length:]))
    scale = query.shape[-1] ** -0.5
    query, keys = query.transpose(1, 2).float().contiguous(), keys.transpose(1, 2).float().contiguous()  # (B, H, ·, d)
    if not text_block:
        probabilities = (query @ keys.transpose(-1, -2) * scale).softmax(dim=-1)
        return probabilities.reshape(batch * heads, tokens, -1)
    # The text block alone: exp(q·k_text·scale − log Σ_all keys exp(q·k·scale)).
    text_scores = query @ keys[:, :, :text_length].transpose(-1, -2) * scale
    probabilities = (text_scores - _logsumexp(query, keys, scale)[..., None]).exp()
    return probabilities.reshape(batch * heads, tokens, text_length)


class JointCaptureProcessor:
    """Wraps a joint layer's original processor: same output, plus the image-query × text-key
    probabilities (B·heads, N, L) for the recorder."""

    observes_attention = True

    def __init__(self, original: Any, recorder: Any, path: str, text_length: int) -> None:
        self.original = original
        self.recorder = recorder
        self.path = path
        self.text_length = text_length

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        if image_rotary_emb is None:  # SD3's processor takes no rotary embedding
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        else:
            output = self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs
            )
        if self.recorder.active:
            probabilities = joint_attention_probabilities(
                attn, hidden_states, encoder_hidden_states, self.text_length, image_rotary_emb
            )
            self.recorder.record(self.path, probabilities, attn.heads)
        return output
