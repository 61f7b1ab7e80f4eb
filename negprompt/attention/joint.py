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

from negprompt.guidance.joint_attention_processors import (
    is_joint_attention,
    project,
    rotate,
    text_key_probabilities,
)


def joint_attention_paths(transformer: Any) -> list[str]:
    """Module paths of every attention layer of an SD3 or FLUX transformer with text keys."""
    return [path for path, module in transformer.named_modules() if is_joint_attention(module)]


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
