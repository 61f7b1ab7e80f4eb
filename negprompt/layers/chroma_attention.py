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
the blocks, as FLUX's (``negprompt.guidance.joint_attention_processors``), with the negative's own text mask and
the text half of a joint block's modulation (``temb[:, 6:]``); the rule's combination is given each row's text
masks, the positive's and the negative's, as logit offsets of the text keys relative to the image keys
(``text_bias``: 0 or −∞ in the boolean form, m_j − 1 in the additive form).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.layers.attention import (
    Combine,
    added_output_projection,
    attention_paths,
    merge_heads,
    output_projection,
    project,
    rotate,
)
from negprompt.layers.processors import installed, observer_of

TEXT_MASK = "text_mask"  # the name of a row's text mask (B, L) in the denoiser inputs' ``added_cond_kwargs``
QUERY_CHUNK = 256  # image queries whose scores (B, H, chunk, L + N) are held at once


# ---------------------------------------------------------------- probabilities


def logit_bias(mask: torch.Tensor) -> torch.Tensor:
    """What a layer's attention mask adds to the logits q·k/√d, float32: a boolean mask 0 where True and −∞ where
    False (the key is excluded); a float mask itself (added as scaled-dot-product attention adds it)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def masked_text_key_probabilities(
    query: torch.Tensor, keys: torch.Tensor, text_length: int, mask: torch.Tensor | None, chunk: int = QUERY_CHUNK
) -> torch.Tensor:
    """The text-key block of softmax(q·kᵀ/√d + mask) over all keys, float32: queries (B, H, N, d), keys
    [text; image] (B, H, L + N, d), ``mask`` broadcastable to (B, 1, N, L + N) (boolean or additive, see
    :func:`logit_bias`; None: no mask) → (B, H, N, L). Computed ``chunk`` queries at a time."""
    scale = query.shape[-1] ** -0.5
    query, keys = query.float(), keys.float().transpose(-1, -2)
    parts = []
    for start in range(0, query.shape[2], chunk):
        scores = query[:, :, start : start + chunk] @ keys * scale
        if mask is not None:
            scores = scores + logit_bias(mask[:, :, start : start + chunk] if mask.shape[2] > 1 else mask)
        parts.append((scores[..., :text_length] - torch.logsumexp(scores, dim=-1, keepdim=True)).exp())
    return torch.cat(parts, dim=2)


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


class ChromaNegativeStream:
    """The negative's text stream (B, L⁻, C) through one call's blocks, its text mask, each block's modulation."""

    def __init__(self, transformer: Any, negative: torch.Tensor, negative_mask: torch.Tensor, rows: slice) -> None:
        self.transformer = transformer
        self.negative = negative  # (B, L⁻, D) T5 states
        self.mask = negative_mask  # (B, L⁻) bool: the negative's kept text tokens
        self.rows = rows
        self.stream: torch.Tensor | None = None
        self.temb: torch.Tensor | None = None  # the current block's modulation, the positive's rows

    def start(self) -> torch.Tensor:
        if self.stream is None:
            self.stream = self.transformer.context_embedder(self.negative)
        return self.stream


def _text_bias(key_mask: torch.Tensor, text_length: int) -> torch.Tensor:
    """The text keys' logit offsets (B, L) relative to the image keys', from an image query's row of a layer's
    mask over [text; image] keys (B, L + N), boolean or additive: 0 or −∞ (boolean), m_j − 1 (additive)."""
    bias = logit_bias(key_mask)
    return bias[:, :text_length] - bias[:, text_length : text_length + 1]


class ChromaNegativeProcessor:
    """One Chroma attention layer's processor for one call: the positive's rows get the rule's combination of
    their attention over [positive text; image] and [negative text; image], each with its own text mask; the
    negative's stream moves through the block; other rows go through ``original`` unchanged."""

    def __init__(
        self, original: Any, block: Any, state: ChromaNegativeStream, combine: Combine, single: bool, branch: str
    ) -> None:
        self.original, self.block, self.state, self.combine, self.single = original, block, state, combine, single
        self.branch = branch
        self.observer = observer_of(original)  # capture: sees the whole batch, and the negative's maps

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        rows = self.state.rows
        whole = rows == slice(0, hidden_states.shape[0])
        mask = None if attention_mask is None else attention_mask[rows]
        if self.single:
            guided = self._single(attn, hidden_states[rows], mask, image_rotary_emb)
        else:
            guided = self._joint(attn, hidden_states[rows], encoder_hidden_states[rows], mask, image_rotary_emb)
        if whole and self.observer is None:  # one pass per step (scale 1): only the positive's rows
            return guided
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        if self.single:
            out = out.clone()
            out[rows] = guided
            return out
        image, text = (o.clone() for o in out)
        image[rows], text[rows] = guided
        return image, text

    def _attend(
        self,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        rotary: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positive text output, guided image output, negative text output), each (B, ·, H·d), before projections.

        ``mask``: the positive rows' (B, 1, L + N, L + N) in the call's form, or None (then the negative is read
        unmasked too). The negative's mask is built in the same form from its own text mask; the combination is
        given both text masks as logit offsets relative to the image keys (``text_bias``)."""
        length, negative_length = text[0].shape[2], negative[0].shape[2]
        q_pos, k_pos, v_pos = (torch.cat([t, i], dim=2) for t, i in zip(text, image))
        q_neg, k_neg, v_neg = (torch.cat([t, i], dim=2) for t, i in zip(negative, image))
        q_pos, k_pos = rotate(q_pos, rotary), rotate(k_pos, rotary)  # text positions are zeros: the negative's too
        q_neg, k_neg = rotate(q_neg, rotary), rotate(k_neg, rotary)
        text_mask = negative_mask = negative_keys = text_bias = None
        if mask is not None:
            image_keep = torch.ones(mask.shape[0], image[0].shape[2], dtype=torch.bool, device=mask.device)
            negative_keys = torch.cat([self.state.mask.to(mask.device), image_keep], dim=1)  # (B, L⁻ + N)
            negative_keys = negative_keys if mask.dtype == torch.bool else negative_keys.to(mask.dtype)
            negative_mask = negative_keys[:, None, :negative_length, None] * negative_keys[:, None, None, :]
            text_mask = mask[:, :, :length]
            text_bias = (_text_bias(mask[:, 0, length], length), _text_bias(negative_keys, negative_length))
        if self.observer is not None and self.observer.wants_context(self.branch):  # the negative's maps
            key_mask = None if negative_keys is None else negative_keys[:, None, None, :]
            probabilities = masked_text_key_probabilities(q_pos[:, :, length:], k_neg, negative_length, key_mask)
            self.observer.observe_context(self.branch, probabilities.flatten(0, 1), probabilities.shape[1])
        text_out = merge_heads(F.scaled_dot_product_attention(q_pos[:, :, :length], k_pos, v_pos, attn_mask=text_mask))
        negative_out = merge_heads(
            F.scaled_dot_product_attention(q_neg[:, :, :negative_length], k_neg, v_neg, attn_mask=negative_mask)
        )
        image_out = self.combine(
            q_pos[:, :, length:],
            (k_pos[:, :, :length], v_pos[:, :, :length]),
            (k_neg[:, :, :negative_length], v_neg[:, :, :negative_length]),
            (k_pos[:, :, length:], v_pos[:, :, length:]),
            text_bias=text_bias,
        )
        return text_out.to(q_pos.dtype), image_out.to(q_pos.dtype), negative_out.to(q_pos.dtype)

    def _joint(
        self, attn: Any, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None, rotary: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A joint block: the positive rows' (image output, text output); moves the negative's stream on with the
        text half of the block's modulation (``temb[:, 6:]``, as ``ChromaTransformerBlock`` gives its text)."""
        block, state = self.block, self.state
        stream = state.start()
        norm_negative, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=state.temb[:, 6:])
        text_out, image_out, negative_out = self._attend(
            project(attn, text, added=True),
            project(attn, norm_negative, added=True),
            project(attn, image, added=False),
            mask,
            rotary,
        )
        stream = stream + gate_msa.unsqueeze(1) * attn.to_add_out(negative_out)
        normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        if stream.dtype == torch.float16:
            stream = stream.clip(-65504, 65504)
        state.stream = stream
        return output_projection(attn, image_out.contiguous()), added_output_projection(attn, text_out)

    def _single(self, attn: Any, tokens: torch.Tensor, mask: torch.Tensor | None, rotary: Any) -> torch.Tensor:
        """A single-stream block: the positive rows' output over [text; image] (the block projects it); moves the
        negative's stream on."""
        block, state = self.block, self.state
        stream = state.start()
        length = stream.shape[1]
        norm_negative, gate = block.norm(stream, emb=state.temb)
        qkv = project(attn, tokens, added=False)
        text = tuple(x[:, :, :length] for x in qkv)
        image = tuple(x[:, :, length:] for x in qkv)
        text_out, image_out, negative_out = self._attend(
            text, project(attn, norm_negative, added=False), image, mask, rotary
        )
        mlp = block.act_mlp(block.proj_mlp(norm_negative))
        stream = stream + gate.unsqueeze(1) * block.proj_out(torch.cat([negative_out, mlp], dim=2))
        if stream.dtype == torch.float16:
            stream = stream.clip(-65504, 65504)
        state.stream = stream
        return torch.cat([text_out, image_out], dim=1)


@contextmanager
def negative_in_chroma_attention(
    transformer: Any, rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative (``negative_inputs``: its denoiser inputs, T5
    states (B, L⁻, D) and ``added_cond_kwargs["text_mask"]`` (B, L⁻)) inside every attention layer, combined by
    ``combine``; forward pre-hooks hand each block's modulation to the negative's stream. Restores the processors
    and removes the hooks on exit (also on error)."""
    negative = negative_inputs["encoder_hidden_states"]
    negative_mask = negative_inputs.get("added_cond_kwargs", {}).get(TEXT_MASK)
    if negative_mask is None:
        negative_mask = torch.ones(negative.shape[:2], dtype=torch.bool, device=negative.device)
    state = ChromaNegativeStream(transformer, negative, negative_mask.bool(), rows)
    blocks = {
        path: transformer.get_submodule(path.removesuffix(".attn")) for path in attention_paths(transformer, "joint")
    }

    def read_temb(module: Any, args: tuple, kwargs: dict) -> None:
        state.temb = kwargs["temb"][rows]  # the transformer calls its blocks with keywords

    def make(path: str, original: Any) -> Any:
        if path not in blocks:
            return None
        single = path.startswith("single_transformer_blocks.")
        return ChromaNegativeProcessor(original, blocks[path], state, combine, single, branch)

    hooks = [block.register_forward_pre_hook(read_temb, with_kwargs=True) for block in blocks.values()]
    try:
        with installed(transformer, make):
            yield
    finally:
        for hook in hooks:
            hook.remove()


# ---------------------------------------------------------------- the reader


class ChromaAttentionReader:
    """Chroma's :class:`~negprompt.layers.readers.AttentionReader`: every joint and single-stream layer (all read
    the text), capture and NAG/VSF under the mask each call carries (boolean or additive).

    ``text_length``: L, the text tokens of every row (T5's ``max_sequence_length``): a single-stream layer's
    tokens are [text; image] with nothing else saying where the text ends."""

    def __init__(self, text_length: int) -> None:
        self.text_length = text_length
        self.negative_in_attention = negative_in_chroma_attention

    def paths(self, denoiser: Any) -> list[str]:
        return attention_paths(denoiser, "joint")

    def capture_processor(self, path: str, original: Any, recorder: Any) -> ChromaCaptureProcessor:
        return ChromaCaptureProcessor(original, recorder, path, self.text_length)
