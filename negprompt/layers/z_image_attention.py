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
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from negprompt.layers.attention import text_key_probabilities

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

    def wants_context(self, branch: str) -> bool:  # an AttentionObserver, for a negative reader to come
        return False

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        return None

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


class ZImageReader:
    """The :class:`~negprompt.layers.readers.AttentionReader` of ``ZImageTransformer2DModel``: capture reads the
    main layers' image-query × caption-key block; NAG and VSF are refused (``negative_in_attention`` None)."""

    negative_in_attention = None

    def __init__(self) -> None:
        self.rows = CallRows()  # the current call's, while a capture runs (see capturing)

    def paths(self, denoiser: Any) -> list[str]:
        """``layers.N.attention``: the refiners' layers read the image alone or the caption alone."""
        return [path for path, _ in denoiser.named_modules() if MAIN_LAYER.fullmatch(path)]

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
