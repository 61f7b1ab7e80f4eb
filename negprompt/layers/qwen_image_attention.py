"""Reading Qwen-Image's joint attention (``QwenImageTransformer2DModel``'s ``transformer_blocks.N.attn``).

Each of Qwen-Image's double-stream blocks (Qwen team 2025, arXiv 2508.02324) meets its image and text streams in
one attention over [text; image] keys, computed by diffusers' ``QwenDoubleStreamAttnProcessor2_0``:

- queries and keys: the image stream's ``to_q``/``to_k`` and the text stream's ``add_q_proj``/``add_k_proj``,
  each with its RMSNorm over the head dimension (``norm_q``, ``norm_k``, ``norm_added_q``, ``norm_added_k``);
- positions (MSRoPE): complex rotary factors, one table for the image tokens (centred frame, row and column) and
  one for the text tokens (on the diagonal after the image), ``image_rotary_emb = (image, text)``, each (N, d/2),
  applied as x·e^{iθ} on consecutive pairs of channels (diffusers' ``apply_rotary_emb_qwen``, ``use_real=False``);
- a key mask: the rows of one call hold prompts of different lengths, zero-padded to the longest, and
  ``encoder_hidden_states_mask`` (B, L) excludes the padding keys from every softmax.

:class:`QwenImageReader` reads the image-query × text-key block of that softmax (over ALL the row's unmasked
keys: its own text tokens and every image token), in the text's token order, zeros at masked keys and past the
call's text length up to the capture's L. It changes nothing: capture lets the layer's own processor compute
its output. Rules acting inside attention (NAG, VSF) are not read here (``negative_in_attention`` is None).
"""

from __future__ import annotations

from typing import Any

import torch

from negprompt.layers.attention import attention_paths, project, text_key_probabilities

# Qwen-Image's rotary factors: (image (N, d/2), text (L, d/2)) complex, as the transformer's ``pos_embed`` returns.
QwenRotary = tuple[torch.Tensor, torch.Tensor]


def rotate_complex(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Qwen-Image's rotary positions on (B, H, N, d): consecutive channel pairs as complex numbers times the
    factors (N, d/2) — diffusers' ``apply_rotary_emb_qwen(..., use_real=False)``, which takes (B, N, H, d)."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen(x.transpose(1, 2), factors, use_real=False).transpose(1, 2)


def qwen_queries_keys(
    attn: Any, image: torch.Tensor, text: torch.Tensor, rotary: QwenRotary | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image queries (B, H, N, d), the text keys (B, H, L, d) and the image keys (B, H, N, d) of one layer, with
    its projections, norms and rotary positions (``image`` (B, N, C), ``text`` (B, L, C): the streams the block
    hands its attention)."""
    _, text_keys = project(attn, text, added=True, values=False)
    query, image_keys = project(attn, image, added=False, values=False)
    if rotary is not None:
        image_factors, text_factors = rotary
        query, image_keys = rotate_complex(query, image_factors), rotate_complex(image_keys, image_factors)
        text_keys = rotate_complex(text_keys, text_factors)
    return query, text_keys, image_keys


def qwen_text_probabilities(
    attn: Any,
    image: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    rotary: QwenRotary | None,
    text_length: int,
) -> torch.Tensor:
    """The text block of softmax(q·kᵀ/√d) of the image queries over each row's [text; image] keys, masked text keys
    left out of the softmax: (B·heads, N, ``text_length``) float32, key j = the row's text token j, zeros at masked
    keys and at j ≥ the call's text length L (``text_mask``: (B, L), nonzero on kept keys; None: all kept)."""
    query, text_keys, image_keys = qwen_queries_keys(attn, image, text, rotary)
    batch, heads, tokens = query.shape[:3]
    length = text_keys.shape[2]
    if length > text_length:
        raise ValueError(f"the call holds {length} text tokens, over the capture's {text_length} text keys")
    probabilities = query.new_zeros((batch, heads, tokens, text_length), dtype=torch.float32)
    for row in range(batch):
        kept = torch.arange(length, device=query.device)
        if text_mask is not None:
            kept = kept[text_mask[row].bool()]
        keys = torch.cat([text_keys[row : row + 1, :, kept], image_keys[row : row + 1]], dim=2)
        probabilities[row, :, :, kept] = text_key_probabilities(query[row : row + 1], keys, len(kept))[0]
    return probabilities.reshape(batch * heads, tokens, text_length)


class QwenCaptureProcessor:
    """Wraps one Qwen-Image attention layer's processor: the same output (the original computes it), and, while
    the recorder is active, the image-query × text-key probabilities (:func:`qwen_text_probabilities`) recorded
    under the layer's module path. Its parameters are named as diffusers' processor names them: ``Attention``
    hands a processor only the keyword arguments its signature names."""

    def __init__(self, original: Any, recorder: Any, path: str) -> None:
        self.original = original
        self.recorder = recorder  # a negprompt.layers.readers.Recorder
        self.path = path

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: QwenRotary | None = None,
    ) -> Any:
        output = self.original(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
        )
        if self.recorder.active and encoder_hidden_states is not None:
            probabilities = qwen_text_probabilities(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                image_rotary_emb,
                self.recorder.text_length,
            )
            self.recorder.record(self.path, probabilities, attn.heads)
        return output


class QwenImageReader:
    """The :class:`~negprompt.layers.readers.AttentionReader` of Qwen-Image: every block's joint attention layer
    (``transformer_blocks.N.attn``), read by :class:`QwenCaptureProcessor`; NAG and VSF are refused."""

    negative_in_attention = None

    def paths(self, denoiser: Any) -> list[str]:
        """``transformer_blocks.N.attn`` for every block, in order: each one's image queries read the text keys."""
        return attention_paths(denoiser, "joint")

    def capture_processor(self, path: str, original: Any, recorder: Any) -> QwenCaptureProcessor:
        return QwenCaptureProcessor(original, recorder, path)
