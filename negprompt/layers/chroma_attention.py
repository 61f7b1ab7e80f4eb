"""Chroma's masked joint attention: reading it (capture) and changing it (NAG, VSF).

Chroma's layers are FLUX's (``FluxAttention`` with ``FluxAttnProcessor``: one softmax over [text; image] keys,
rotary positions, joint and single-stream blocks; Esser et al. 2024, Fig. 2) with one difference: every block
hands its layer the mask m_i·m_j over [text; image] tokens, (B, 1, L + N, L + N), built from each row's text mask
(the prompt's tokens and one padding token kept) followed by True for every image token. The mask comes in one
of two forms, and the reader follows the one the call carries:

- **boolean** (the model's reference, negprompt's default): a False key takes no part in the softmax;
- **additive** (diffusers 0.42.1's ``ChromaPipeline``): 0/1 in the prompt's dtype, *added* to the logits
  q·k/√d, so a padding key keeps weight e⁻¹ relative to a kept one (diffusers issue #12116).

Capture (:class:`ChromaCaptureProcessor`) records, beside the layer's own output, the image-query × text-key
block of softmax(q·kᵀ/√d + mask) over all keys of the row: (B·heads, N, L), zero at masked keys in the boolean
form. NAG and VSF (:func:`negative_in_chroma_attention`) run the negative's text as a stream of its own through
the blocks with FLUX's code (:mod:`negprompt.layers.joint_negative`), given the negative's own text mask and
the text half of a joint block's modulation (``temb[:, 6:]``); the rule's combination is given each row's text
masks, the positive's and the negative's, as logit offsets of the text keys relative to the image keys
(``text_bias``: 0 or −∞ in the boolean form, m_j − 1 in the additive form).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from negprompt.layers.attention import Combine, attention_paths, project, rotate
from negprompt.layers.joint_negative import (  # noqa: F401 (logit_bias, QUERY_CHUNK: read here by name before)
    QUERY_CHUNK,
    joint_negative_run,
    logit_bias,
    masked_text_key_probabilities,
)
from negprompt.layers.readers import NegativeCaller

TEXT_MASK = "text_mask"  # the name of a row's text mask (B, L) in the denoiser inputs' ``added_cond_kwargs``
TEXT_MODULATION = slice(6, None)  # the text half of a joint block's modulation (``ChromaTransformerBlock``)


# ---------------------------------------------------------------- probabilities


def masked_joint_attention_probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    text_length: int,
    attention_mask: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The image queries' attention on the text keys of one Chroma layer, (B·heads, N, L) float32.

    ``hidden_states``: the image tokens (B, N, C), or for a single-stream layer (``encoder_hidden_states`` None)
    [text; image] tokens (B, L + N, C) with L = ``text_length``; ``attention_mask``: the layer's
    (B, 1, L + N, L + N), boolean or additive; ``rotary``: (cos, sin) over [text; image] positions."""
    if encoder_hidden_states is None:
        text, image = hidden_states[:, :text_length], hidden_states[:, text_length:]
        _, text_keys = project(attn, text, added=False, values=False)
    else:
        text, image = encoder_hidden_states, hidden_states
        _, text_keys = project(attn, text, added=True, values=False)
    query, image_keys = project(attn, image, added=False, values=False)
    keys = torch.cat([text_keys, image_keys], dim=2)  # [text; image], the processor's order
    if rotary is not None:
        cos, sin = rotary
        keys, query = rotate(keys, rotary), rotate(query, (cos[text_length:], sin[text_length:]))
    rows = None if attention_mask is None else attention_mask[:, :, text_length:]  # the image queries' rows
    probabilities = masked_text_key_probabilities(query, keys, text_length, rows)
    batch, heads, tokens = query.shape[:3]
    return probabilities.reshape(batch * heads, tokens, text_length)


# ---------------------------------------------------------------- capture


class ChromaCaptureProcessor:
    """Wraps a Chroma attention layer's original processor: same output, plus the image-query × text-key
    probabilities (B·heads, N, L) under the call's mask for the recorder. An
    :class:`~negprompt.layers.processors.AttentionObserver`: NAG's and VSF's processor hands it the negative's."""

    def __init__(self, original: Any, recorder: Any, path: str, text_length: int) -> None:
        self.original, self.recorder, self.path, self.text_length = original, recorder, path, text_length

    def wants_context(self, branch: str) -> bool:
        return self.recorder.wants_context(branch)

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        self.recorder.record_context(self.path, branch, probabilities, heads)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        if self.recorder.active:
            probabilities = masked_joint_attention_probabilities(
                attn, hidden_states, encoder_hidden_states, self.text_length, attention_mask, image_rotary_emb
            )
            self.recorder.record(self.path, probabilities, attn.heads)
        return output


# ---------------------------------------------------------------- NAG and VSF: the negative's own text stream


def _negative_and_mask(negative_inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative's T5 states (B, L⁻, D) and its kept tokens (B, L⁻) bool (all, where its inputs carry no mask)."""
    negative = negative_inputs["encoder_hidden_states"]
    negative_mask = negative_inputs.get("added_cond_kwargs", {}).get(TEXT_MASK)
    if negative_mask is None:
        negative_mask = torch.ones(negative.shape[:2], dtype=torch.bool, device=negative.device)
    return negative, negative_mask.bool()


@contextmanager
def negative_in_chroma_attention(
    transformer: Any, rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative (``negative_inputs``: its denoiser inputs, T5
    states (B, L⁻, D) and ``added_cond_kwargs["text_mask"]`` (B, L⁻)) inside every attention layer, combined by
    ``combine``; forward pre-hooks hand each block's modulation to the negative's stream. Restores the processors
    and removes the hooks on exit (also on error)."""
    with chroma_negative_run(transformer) as call, call(rows, negative_inputs, combine, branch):
        yield


@contextmanager
def chroma_negative_run(transformer: Any) -> Iterator[NegativeCaller]:
    """Installs the negative's processors on every attention layer for a run (they pass through at calls given no
    negative); yields what hands them one call's negative (as :func:`negative_in_chroma_attention` takes it)."""
    with joint_negative_run(transformer, TEXT_MODULATION) as run:

        def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
            negative, negative_mask = _negative_and_mask(negative_inputs)
            return run.call(rows, negative, combine, branch, negative_mask)

        yield call


# ---------------------------------------------------------------- the reader


class ChromaAttentionReader:
    """Chroma's :class:`~negprompt.layers.readers.AttentionReader`: every joint and single-stream layer (all read
    the text), capture and NAG/VSF under the mask each call carries (boolean or additive).

    ``text_length``: L, the text tokens of every row (T5's ``max_sequence_length``): a single-stream layer's
    tokens are [text; image] with nothing else saying where the text ends."""

    def __init__(self, text_length: int) -> None:
        self.text_length = text_length
        self.negative_in_attention = negative_in_chroma_attention
        self.negative_in_attention_run = chroma_negative_run

    def paths(self, denoiser: Any) -> list[str]:
        return attention_paths(denoiser, "joint")

    def capture_processor(self, path: str, original: Any, recorder: Any) -> ChromaCaptureProcessor:
        return ChromaCaptureProcessor(original, recorder, path, self.text_length)
