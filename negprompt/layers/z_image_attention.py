"""Reading Z-Image's single-stream attention: the image-query × caption-key block of ``layers.N.attention``.

``ZImageTransformer2DModel`` (Tongyi-MAI 2025; diffusers' ``transformer_z_image.py``) refines image tokens and
caption tokens apart (``noise_refiner``: image alone, ``context_refiner``: caption alone), then runs one sequence
per row through its main blocks, whose attention layers ``layers.N.attention`` take, per row i::

    [ N image tokens | image pad tokens up to a multiple of 32 | L_i caption tokens | caption pads | batch padding ]

Only the batch padding is masked (a boolean (B, S) key mask, None when every row has the same length); the pad
tokens are keys like any other. Queries and keys are computed as ``ZSingleStreamAttnProcessor`` computes them
(q, k, v from the one sequence; RMSNorm of q and k over d; complex rotary positions ``freqs_cis`` multiplying
q and k), and the map of a layer is the softmax over every unmasked key of the row restricted to the image
queries [0, N) and the caption keys [N_pad, N_pad + L_i), in the caption's token order (key j = the templated
prompt's token j), zeros past L_i. Nothing in a layer's call says where its image tokens end or how long each
caption is; a forward pre-hook on the transformer reads both from the call's inputs (the image list and the
caption list, one entry per row) into a :class:`CallRows` for the processors, for the length of a capture
(:meth:`ZImageReader.capturing`).

NAG and VSF (:func:`z_image_negative_run`, installed once per run; :func:`negative_in_z_image_attention` for one
call) run the negative's caption as a stream of its own, as the joint-attention readers run a negative's text:
embedded (``cap_embedder``, pads to a multiple of 32 as ``cap_pad_token``), refined alone (``context_refiner``; once
per run), then through every main block with the positive rows' modulation (``adaLN_modulation`` of the call's
time embedding), its tokens attending over [image; negative caption]. In the positive's rows the image queries (the
image's pad tokens too) get the rule's combination of their attention over [image; caption] and over [image;
negative caption]; the caption's queries attend as the layer's own processor has them attend. The negative's
caption takes the positions the transformer gives a caption (1 … L⁻ on the first axis); the image keeps the
positive's (after the positive's caption), so the image sits from the negative's caption as from the positive's
only where both pad to one length.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.layers.attention import Combine, merge_heads, text_key_probabilities
from negprompt.layers.processors import CallSlot, PerNegative, installed, observer_of
from negprompt.layers.readers import NegativeCaller
from negprompt.layers.text_keys import combine_texts

SEQUENCE_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: each row's image and caption tokens are padded to a multiple
MAIN_LAYER = re.compile(r"layers\.\d+\.attention")  # the main blocks' attention: image queries, caption keys


@dataclass(frozen=True)
class RowGeometry:
    """Where one row's tokens sit in a main layer's sequence."""

    image_tokens: int  # N: queries [0, N) are the image's patches
    caption_tokens: int  # L_i: the caption's keys follow the padded image tokens

    @property
    def caption_start(self) -> int:
        """N rounded up to a multiple of 32: the image's pad tokens come first."""
        return self.image_tokens + (-self.image_tokens) % SEQUENCE_MULTIPLE

    @property
    def caption_end(self) -> int:
        """Where the row's caption keys end: L_i rounded up to a multiple of 32 after ``caption_start``."""
        return self.caption_start + self.caption_tokens + (-self.caption_tokens) % SEQUENCE_MULTIPLE


def call_geometry(forward: Any, args: tuple, kwargs: dict) -> list[RowGeometry]:
    """Each row's geometry from ``ZImageTransformer2DModel.forward``'s inputs: latents (C, F, H, W) patchified
    f_patch × patch × patch into (F/f_patch)·(H/patch)·(W/patch) tokens, and the caption's (L_i, D) states."""
    bound = inspect.signature(forward).bind(*args, **kwargs)
    bound.apply_defaults()
    images, captions = bound.arguments["x"], bound.arguments["cap_feats"]
    patch, frames = int(bound.arguments["patch_size"]), int(bound.arguments["f_patch_size"])
    if images and isinstance(images[0], list):
        raise ValueError("negprompt reads Z-Image's attention with one image per row, not the Omni model's lists")
    return [
        RowGeometry((image.shape[1] // frames) * (image.shape[2] // patch) * (image.shape[3] // patch), len(caption))
        for image, caption in zip(images, captions)
    ]


class CallRows:
    """The current denoiser call's row geometry, written by the transformer's forward pre-hook during a capture."""

    def __init__(self) -> None:
        self.rows: list[RowGeometry] | None = None

    def current(self) -> list[RowGeometry]:
        if self.rows is None:
            raise RuntimeError("Z-Image's capture processor ran outside ZImageReader.capturing (no row geometry)")
        return self.rows


# ---------------------------------------------------------------- the processor's math


def rotate_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's rotary positions on (B, S, H, d): pairs of d as complex numbers times ``freqs_cis`` (B, S, d/2),
    as ``ZSingleStreamAttnProcessor`` applies them (in float32, back to x's dtype)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def queries_keys(
    attn: Any, hidden_states: torch.Tensor, freqs_cis: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A single-stream layer's queries and keys (B, H, S, d) of its tokens (B, S, C): projections, RMSNorms
    over d, rotary positions, as the layer's processor computes them."""
    query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
    key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if freqs_cis is not None:
        query, key = rotate_complex(query, freqs_cis), rotate_complex(key, freqs_cis)
    return query.transpose(1, 2), key.transpose(1, 2)


def caption_probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    freqs_cis: torch.Tensor | None,
    rows: Sequence[RowGeometry],
    text_length: int,
) -> torch.Tensor:
    """softmax(q·kᵀ/√d) of each row's image queries over all its unmasked keys, the caption's block: float32
    (B·heads, N, ``text_length``), key j = caption token j, zeros past the row's L_i."""
    query, key = queries_keys(attn, hidden_states, freqs_cis)
    batch, heads, sequence = key.shape[:3]
    if len(rows) != batch or len({row.image_tokens for row in rows}) != 1:
        raise ValueError(f"a call of {batch} rows needs as many rows of one image size, got {rows}")
    images = rows[0].image_tokens
    out = query.new_zeros((batch, heads, images, text_length), dtype=torch.float32)
    positions = torch.arange(sequence, device=key.device)
    for i, row in enumerate(rows):
        first, last = row.caption_start, row.caption_start + row.caption_tokens
        if row.caption_tokens > text_length:
            raise ValueError(f"row {i} has {row.caption_tokens} caption tokens, over the {text_length} text keys")
        unmasked = torch.ones_like(positions, dtype=torch.bool) if attention_mask is None else attention_mask[i]
        others = unmasked & ((positions < first) | (positions >= last))
        keys = torch.cat([key[i : i + 1, :, first:last], key[i : i + 1, :, others]], dim=2)  # [caption; the rest]
        out[i, :, :, : row.caption_tokens] = text_key_probabilities(query[i : i + 1, :, :images], keys, last - first)[0]
    return out.reshape(batch * heads, images, text_length)


# ---------------------------------------------------------------- capture


class ZImageCaptureProcessor:
    """Wraps a main layer's original processor: the same output, plus its caption probabilities for the recorder."""

    def __init__(self, original: Any, recorder: Any, path: str, rows: CallRows) -> None:
        self.original, self.recorder, self.path, self.rows = original, recorder, path, rows

    def wants_context(self, branch: str) -> bool:  # an AttentionObserver: NAG's and VSF's processor hands it
        return self.recorder.wants_context(branch)

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes the negative's (B·heads, N, L⁻), zero-padded to the capture's L caption keys."""
        length = probabilities.shape[-1]
        if length > self.recorder.text_length:
            raise ValueError(f"the negative has {length} caption tokens, over the {self.recorder.text_length} keys")
        padded = F.pad(probabilities, (0, self.recorder.text_length - length))
        self.recorder.record_context(self.path, branch, padded, heads)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        if self.recorder.active:
            probabilities = caption_probabilities(
                attn, hidden_states, attention_mask, freqs_cis, self.rows.current(), self.recorder.text_length
            )
            self.recorder.record(self.path, probabilities, attn.heads)
        return output


# ---------------------------------------------------------------- NAG and VSF: the negative's own caption stream


def refined_caption(transformer: Any, negative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption's states (B, L⁻, D) as the transformer starts a caption: embedded, padded to a multiple of 32 with
    ``cap_pad_token``, refined alone at positions 1 … L⁻ (``context_refiner``); with their rotary factors
    (B, L⁻ padded, d/2) complex. Returns (stream (B, L⁻ padded, C), factors)."""
    batch, length = negative.shape[:2]
    padded = length + (-length) % SEQUENCE_MULTIPLE
    feats = transformer.cap_embedder(negative)
    pads = transformer.cap_pad_token.to(feats.dtype).expand(batch, padded - length, -1)
    feats = torch.cat([feats, pads], dim=1)
    ids = torch.zeros(padded, 3, dtype=torch.int32, device=feats.device)
    ids[:, 0] = torch.arange(1, padded + 1, dtype=torch.int32, device=feats.device)
    freqs = transformer.rope_embedder(ids)[None].expand(batch, -1, -1)
    for layer in transformer.context_refiner:
        feats = layer(feats, None, freqs)
    return feats, freqs


class ZImageNegativeStream:
    """One call's negative: its caption stream (B, L⁻ padded, C) through the call's main blocks, its rotary factors,
    the call's row geometry, the current block's time embedding (the positive's rows), the positive's rows, the
    rule's combination and the negative's branch name (for observers)."""

    def __init__(
        self,
        transformer: Any,
        negative: torch.Tensor,
        rows: slice,
        combine: Combine | None = None,
        branch: str = "negative",
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.transformer, self.negative, self.rows = transformer, negative, rows  # negative: (B, L⁻, D) states
        self.combine, self.branch = combine, branch
        self.call_rows = CallRows()  # set by the transformer's forward pre-hook
        # (B, L⁻ padded, C) and (B, L⁻ padded, d/2) complex: refined_caption(negative), where the run computed it
        self.stream, self.freqs = (None, None) if start is None else start
        self.adaln: torch.Tensor | None = None  # set by each main block's forward pre-hook

    def start(self) -> torch.Tensor:
        """The stream as the transformer starts a caption (:func:`refined_caption`)."""
        if self.stream is None:
            self.stream, self.freqs = refined_caption(self.transformer, self.negative)
        return self.stream


def values_of(attn: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """A single-stream layer's values (B, H, S, d) of its tokens (B, S, C)."""
    return attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def block_modulation(block: Any, adaln: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A main block's (scale_msa, gate_msa, scale_mlp, gate_mlp), each (B, 1, C), as ``ZImageTransformerBlock``
    computes them from the time embedding (B, C')."""
    scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
    return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()


class ZImageNegativeProcessor:
    """One main layer's processor of NAG or VSF (see the module docstring), installed for a run: at a call ``slot``
    holds a :class:`ZImageNegativeStream`, the positive's rows are recomputed and the negative's caption stream
    moved through the block; other rows, and every call while ``slot`` holds none, go through ``original``."""

    def __init__(self, original: Any, block: Any, slot: CallSlot) -> None:
        self.original, self.block, self.slot = original, block, slot
        self.observer = observer_of(original)  # capture: sees the whole batch, and the negative's maps

    @property
    def state(self) -> ZImageNegativeStream:
        return self.slot.current

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.slot.current is None:  # a call without the negative (another group, outside its window)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        rows = self.state.rows
        geometry = self.state.call_rows.current()[rows]
        if len({row.image_tokens for row in geometry}) != 1:
            raise ValueError(f"NAG and VSF on Z-Image need one image size in the positive's rows, got {geometry}")
        start, end = geometry[0].caption_start, max(row.caption_end for row in geometry)
        kept = None
        if any(row.caption_end != end for row in geometry):  # rows of other caption lengths: the batch padding
            kept = (
                torch.arange(end, device=hidden_states.device)[None]
                < torch.tensor([row.caption_end for row in geometry], device=hidden_states.device)[:, None]
            )
        freqs = None if freqs_cis is None else freqs_cis[rows, :end]
        guided = self._single(attn, hidden_states[rows, :end], freqs, start, geometry[0].image_tokens, kept)
        if rows == slice(0, hidden_states.shape[0]) and self.observer is None:  # scale 1: the positive's rows only
            return guided
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis).clone()
        out[rows, :end] = guided
        return out

    def _single(
        self,
        attn: Any,
        tokens: torch.Tensor,
        freqs: torch.Tensor | None,
        start: int,
        images: int,
        kept: torch.Tensor | None,
    ) -> torch.Tensor:
        """The positive rows' layer output (B, S, C) of their tokens [image; caption] (B, S, C), the caption from
        ``start`` (``kept``: (B, S) keys not batch padding, or None); moves the negative's stream on as
        ``ZImageTransformerBlock`` moves its tokens."""
        block, state = self.block, self.state
        stream = state.start()
        scale_msa, gate_msa, scale_mlp, gate_mlp = block_modulation(block, state.adaln)
        negative_tokens = block.attention_norm1(stream) * scale_msa
        query, key = queries_keys(attn, tokens, freqs)
        value = values_of(attn, tokens)
        q_neg, k_neg = queries_keys(attn, negative_tokens, state.freqs)
        v_neg = values_of(attn, negative_tokens)
        image = (key[:, :, :start], value[:, :, :start])
        mask = None if kept is None else kept[:, None, None, :]
        caption_out = F.scaled_dot_product_attention(query[:, :, start:], key, value, attn_mask=mask)
        negative_keys, negative_values = torch.cat([image[0], k_neg], dim=2), torch.cat([image[1], v_neg], dim=2)
        negative_out = F.scaled_dot_product_attention(q_neg, negative_keys, negative_values)
        if self.observer is not None and self.observer.wants_context(state.branch):  # the negative's maps
            keys = torch.cat([k_neg, image[0]], dim=2)  # [negative caption; image], its L⁻ tokens first
            probabilities = text_key_probabilities(query[:, :, :images], keys, state.negative.shape[1])
            self.observer.observe_context(state.branch, probabilities.flatten(0, 1), probabilities.shape[1])
        caption_bias = None
        if kept is not None:
            caption_bias = torch.zeros(kept[:, start:].shape, device=kept.device).masked_fill(
                ~kept[:, start:], float("-inf")
            )
        text = (key[:, :, start:], value[:, :, start:])
        image_out = combine_texts(state.combine, query[:, :, :start], text, (k_neg, v_neg), image, (caption_bias, None))
        negative_out = attn.to_out[0](merge_heads(negative_out).to(stream.dtype))
        stream = stream + gate_msa * block.attention_norm2(negative_out)
        state.stream = stream + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(stream) * scale_mlp))
        out = torch.cat([image_out.to(tokens.dtype), merge_heads(caption_out).to(tokens.dtype)], dim=1)
        out = attn.to_out[0](out)
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def main_layer_paths(denoiser: Any) -> list[str]:
    """``layers.N.attention``, in order: the refiners' layers read the image alone or the caption alone."""
    return [path for path, _ in denoiser.named_modules() if MAIN_LAYER.fullmatch(path)]


@contextmanager
def negative_in_z_image_attention(
    transformer: Any, rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative (``negative_inputs["encoder_hidden_states"]``:
    its caption states (B, L⁻, D)) inside every main layer, combined by ``combine`` (:func:`z_image_negative_run`
    for one call); processors and hooks are restored on exit (also on error)."""
    with z_image_negative_run(transformer) as call, call(rows, negative_inputs, combine, branch):
        yield


@contextmanager
def z_image_negative_run(transformer: Any) -> Iterator[NegativeCaller]:
    """Installs :class:`ZImageNegativeProcessor` on every main layer for a run, with forward pre-hooks that hand the
    current call's negative stream the call's row geometry and each block's time embedding (all pass through at
    calls given no negative); yields what hands them one call's negative (as :func:`negative_in_z_image_attention`
    takes it). The negative's refined caption (:func:`refined_caption`) is computed once per run for each negative
    tensor (the loop hands the same tensor for the same inputs). Processors and hooks are restored on exit (also on
    error)."""
    slot = CallSlot()
    starts = PerNegative(lambda states: refined_caption(transformer, states))  # once per run
    blocks = {
        path: transformer.get_submodule(path.removesuffix(".attention")) for path in main_layer_paths(transformer)
    }

    def read_rows(module: Any, args: tuple, kwargs: dict) -> None:
        state: ZImageNegativeStream | None = slot.current
        if state is not None:
            state.call_rows.rows = call_geometry(module.forward, args, kwargs)

    def read_adaln(module: Any, args: tuple, kwargs: dict) -> None:
        state: ZImageNegativeStream | None = slot.current
        if state is None:
            return
        # ZImageTransformerBlock.forward(x, attn_mask, freqs_cis, adaln_input, noise_mask, …), called positionally
        adaln = kwargs["adaln_input"] if "adaln_input" in kwargs else args[3]
        if adaln is None or not module.modulation:
            raise ValueError("NAG and VSF on Z-Image read a main block's time modulation; this block has none")
        state.adaln = adaln[state.rows]

    def make(path: str, original: Any) -> Any:
        return ZImageNegativeProcessor(original, blocks[path], slot) if path in blocks else None

    def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
        states = negative_inputs["encoder_hidden_states"]
        return slot.holding(ZImageNegativeStream(transformer, states, rows, combine, branch, starts(states)))

    hooks = [transformer.register_forward_pre_hook(read_rows, with_kwargs=True)]
    hooks += [block.register_forward_pre_hook(read_adaln, with_kwargs=True) for block in blocks.values()]
    try:
        with installed(transformer, make):
            yield call
    finally:
        for hook in hooks:
            hook.remove()


class ZImageReader:
    """The :class:`~negprompt.layers.readers.AttentionReader` of ``ZImageTransformer2DModel``: capture reads the
    main layers' image-query × caption-key block; NAG and VSF change it (:func:`z_image_negative_run`, once per
    run; :func:`negative_in_z_image_attention` for one call)."""

    def __init__(self) -> None:
        self.rows = CallRows()  # the current call's, while a capture runs (see capturing)
        self.negative_in_attention = negative_in_z_image_attention
        self.negative_in_attention_run = z_image_negative_run

    def paths(self, denoiser: Any) -> list[str]:
        """``layers.N.attention``: the refiners' layers read the image alone or the caption alone."""
        return main_layer_paths(denoiser)

    def capture_processor(self, path: str, original: Any, recorder: Any) -> ZImageCaptureProcessor:
        return ZImageCaptureProcessor(original, recorder, path, self.rows)

    @contextmanager
    def capturing(self, denoiser: Any) -> Iterator[None]:
        """While a capture runs: a forward pre-hook on the transformer hands each call's row geometry to the
        capture processors; removed on exit (also on error)."""

        def read(module: Any, args: tuple, kwargs: dict) -> None:
            self.rows.rows = call_geometry(module.forward, args, kwargs)

        hook = denoiser.register_forward_pre_hook(read, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            self.rows.rows = None
