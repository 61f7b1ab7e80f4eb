"""Reading and changing the text attention of Wan's video transformer (``WanTransformer3DModel``; Wan 2.1/2.2).

Each ``WanTransformerBlock`` has two attention layers (``WanAttention``): ``attn1``, self-attention over the video
tokens with 3-D rotary positions, and ``attn2``, cross-attention of the video tokens (queries) to the text states
(keys and values: UMT5's states after the transformer's ``condition_embedder.text_embedder``; in image-to-video
the image encoder's states lead them, with keys and values of their own through ``add_k_proj``/``add_v_proj``).
The text enters only through ``attn2``: it is the layer negprompt reads and changes, as a UNet's cross-attention.

The video tokens come from the patch embedding (patch (1, 2, 2)) over (F', h', w') — latent frames, then rows,
then columns — so a layer's N = F'·h'·w' queries are F' frames of h'·w' tokens each, frame by frame
(:class:`~negprompt.layers.layout.AttentionLayout` ``frames``; capture splits the maps per frame).

Everything is computed as diffusers' ``WanAttnProcessor`` computes it, on (B, H, N, d): q = RMSNorm(to_q(x)) and
k = RMSNorm(to_k(text)) with the norms across all heads (before the heads are split), no rotary positions in
``attn2``, output ``to_out`` of softmax(q·kᵀ/√d)·v. :class:`WanAttentionReader` (the family's
:class:`~negprompt.layers.readers.AttentionReader`) gives:

- capture: :class:`WanCaptureProcessor` lets the layer's own processor compute its output and, beside it,
  softmax(q·kᵀ/√d) of the video queries over the text keys (B·heads, N, L);
- NAG and VSF (at CFG 1, where a step-distilled Wan drops a plain negative): :func:`wan_negative_run` (installed
  once per run; :func:`negative_in_wan_attention` for one call) gives the positive's rows ``combine`` of their attention over the positive's text and over the negative's
  (the negative's UMT5 states through the same ``text_embedder``), as
  :class:`negprompt.guidance.attention_processors.NegativeAttentionProcessor` does for a UNet.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from negprompt.layers.attention import Combine, KeysValues, output_projection, split_heads
from negprompt.layers.processors import CallSlot, PerNegative, installed, observer_of
from negprompt.layers.readers import NegativeCaller

TEXT_CONTEXT = 512  # diffusers' WanAttnProcessor: the text context's length, after the image context (I2V)


# ---------------------------------------------------------------- projections


def has_image_context(attn: Any) -> bool:
    """Whether the layer also reads an image context (image-to-video: ``add_k_proj``/``add_v_proj``)."""
    return getattr(attn, "add_k_proj", None) is not None


def text_context(attn: Any, context: torch.Tensor) -> torch.Tensor:
    """The text part (B, L, D) of a layer's context: all of it, or, in image-to-video, its last 512 tokens (the
    image's lead, as ``WanAttnProcessor`` splits them)."""
    return context[:, context.shape[1] - TEXT_CONTEXT :] if has_image_context(attn) else context


def queries(attn: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's queries (B, H, N, d) of video tokens (B, N, C): RMSNorm across heads, then the heads split."""
    return split_heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)


def keys_values(attn: Any, text: torch.Tensor) -> KeysValues:
    """The layer's keys and values (B, H, L, d) of text states (B, L, D), fused projection or not."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_kv"):
        key, value = attn.to_kv(text).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text), attn.to_v(text)
    return split_heads(attn.norm_k(key), attn.heads), split_heads(value, attn.heads)


def text_probabilities(attn: Any, hidden_states: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of the video queries over the text keys, (B·heads, N, L) float32: ``hidden_states``
    (B, N, C), ``text`` (B, L, D) (the text part of the context)."""
    query = queries(attn, hidden_states).float()
    key = keys_values(attn, text)[0].float()
    scores = (query @ key.transpose(-1, -2)).mul_(query.shape[-1] ** -0.5)  # (B, H, N, L)
    # exp(s − log Σ exp s) in place: one (B, H, N, L) tensor at a time (a video's N is tens of thousands of tokens)
    return scores.sub_(scores.logsumexp(dim=-1, keepdim=True)).exp_().flatten(0, 1)


def fit_length(probabilities: torch.Tensor, length: int) -> torch.Tensor:
    """Probabilities (…, L_layer) on ``length`` text keys: cut, or zeros for keys the layer does not have."""
    have = probabilities.shape[-1]
    if have >= length:
        return probabilities[..., :length]
    return torch.nn.functional.pad(probabilities, (0, length - have))


# ---------------------------------------------------------------- capture


class WanCaptureProcessor:
    """Wraps an ``attn2`` layer's processor: the same output, plus the video-query × text-key probabilities
    (B·heads, N, L) for the recorder. An :class:`~negprompt.layers.processors.AttentionObserver`."""

    def __init__(self, original: Any, recorder: Any, path: str) -> None:
        self.original, self.recorder, self.path = original, recorder, path

    def wants_context(self, branch: str) -> bool:
        return self.recorder.wants_context(branch)

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        self.recorder.record_context(self.path, branch, fit_length(probabilities, self.recorder.text_length), heads)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if self.recorder.active and encoder_hidden_states is not None:
            probabilities = text_probabilities(attn, hidden_states, text_context(attn, encoder_hidden_states))
            self.recorder.record(self.path, fit_length(probabilities, self.recorder.text_length), attn.heads)
        return output


# ---------------------------------------------------------------- NAG and VSF


@dataclass(frozen=True)
class WanNegativeCall:
    """One call's negative: the positive's rows, the negative's projected text (B, L⁻, D), the rule's combination,
    the negative's branch name (for observers), and the run's cache of its keys and values by layer."""

    rows: slice
    negative: torch.Tensor
    combine: Combine
    branch: str
    keys_values: dict[int, KeysValues]


class WanNegativeProcessor:
    """One ``attn2`` layer's processor of NAG or VSF, installed for a run: at a call ``slot`` holds a
    :class:`WanNegativeCall`, its rows (the positive's) get ``combine`` of their attention over their text and over
    the negative's projected text; other rows, and every call while ``slot`` holds none, go through ``original``.
    An observing ``original`` (capture) still sees the whole batch and is given the positive rows' attention on the
    negative as the call's branch."""

    def __init__(self, original: Any, slot: CallSlot) -> None:
        self.original, self.slot = original, slot
        self.observer = observer_of(original)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call: WanNegativeCall | None = self.slot.current
        if call is None or encoder_hidden_states is None:  # no negative at this call, or not a cross-attention call
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if has_image_context(attn) or attention_mask is not None:
            raise ValueError("NAG and VSF on Wan read text-to-video layers without a mask (no image context)")
        rows, whole = call.rows, call.rows == slice(0, hidden_states.shape[0])
        video, text = hidden_states[rows], encoder_hidden_states[rows]
        query = queries(attn, video)
        negative_keys_values = call.keys_values.get(id(attn))
        if negative_keys_values is None:  # once per run and negative
            negative_keys_values = call.keys_values[id(attn)] = keys_values(attn, call.negative)
        z = call.combine(query, keys_values(attn, text), negative_keys_values, None)
        guided = output_projection(attn, z.to(query.dtype))
        if self.observer is not None and self.observer.wants_context(call.branch):
            probabilities = text_probabilities(attn, video, call.negative)
            self.observer.observe_context(call.branch, probabilities, attn.heads)
        if whole and self.observer is None:  # one pass a step (scale 1): only the positive's rows
            return guided
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs).clone()
        out[rows] = guided
        return out


def wan_text_attention_paths(transformer: Any) -> list[str]:
    """Module paths, in the transformer's order, of its layers with text keys: every block's ``attn2``."""
    return [
        path
        for path, module in transformer.named_modules()
        if path.endswith(".attn2") and getattr(module, "is_cross_attention", False)
    ]


def projected_text(transformer: Any, states: torch.Tensor) -> torch.Tensor:
    """UMT5 states (B, L, D_text) as the transformer's layers read them: ``condition_embedder.text_embedder``."""
    embedder = transformer.condition_embedder.text_embedder
    return embedder(states.to(next(embedder.parameters()).dtype))


@contextmanager
def negative_in_wan_attention(
    transformer: Any, rows: slice, negative_inputs: dict[str, Any], combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, installs :class:`WanNegativeProcessor` on every ``attn2`` of a Wan transformer, the negative
    being ``negative_inputs["encoder_hidden_states"]`` (B, L⁻, D_text), UMT5's states, projected once; restores
    the processors on exit (also on error)."""
    with wan_negative_run(transformer) as call, call(rows, negative_inputs, combine, branch):
        yield


@contextmanager
def wan_negative_run(transformer: Any) -> Iterator[NegativeCaller]:
    """Installs :class:`WanNegativeProcessor` on every ``attn2`` of a Wan transformer for a run (passing through at
    calls given no negative); yields what hands them one call's negative (as :func:`negative_in_wan_attention`
    takes it). The negative's projection, keys and values are computed once per run for each negative tensor (the
    loop hands the same tensor for the same inputs). Restores the processors on exit (also on error)."""
    slot = CallSlot()
    wanted = set(wan_text_attention_paths(transformer))
    made = PerNegative(lambda states: (projected_text(transformer, states), {}))  # projection, K/V cache by layer

    def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
        states = negative_inputs["encoder_hidden_states"]
        projected, keys_values = made(states)
        return slot.holding(WanNegativeCall(rows, projected, combine, branch, keys_values))

    with installed(
        transformer, lambda path, original: WanNegativeProcessor(original, slot) if path in wanted else None
    ):
        yield call


class WanAttentionReader:
    """The :class:`~negprompt.layers.readers.AttentionReader` of Wan's transformer (text-to-video)."""

    def paths(self, denoiser: Any) -> list[str]:
        return wan_text_attention_paths(denoiser)

    def capture_processor(self, path: str, original: Any, recorder: Any) -> Any:
        return WanCaptureProcessor(original, recorder, path)

    def negative_in_attention(
        self, denoiser: Any, rows: slice, negative_inputs: dict[str, Any], combine: Combine, branch: str
    ) -> Any:
        return negative_in_wan_attention(denoiser, rows, negative_inputs, combine, branch)

    def negative_in_attention_run(self, denoiser: Any) -> Any:
        return wan_negative_run(denoiser)
