"""The negative's own text stream through an MMDiT's joint and single-stream blocks (SD3, FLUX, Chroma), for NAG and VSF.

In an MMDiT the text tokens are a stream that every block updates (Esser et al. 2024, Fig. 2); a negative read
inside attention therefore needs its own text stream through the blocks, not a fixed context. For a run,
:func:`joint_negative_run` installs on every joint attention layer (keyed by module path; SD3.5's image-only
``attn2`` layers keep their processors) a :class:`JointNegativeProcessor` that, at the calls given a negative
(:meth:`JointNegativeRun.call`; :func:`negative_in_joint_layers` for one call), for the positive branch's rows:

- gives the image queries the rule's combination (a :data:`~negprompt.layers.attention.Combine`) in place of
  their attention over [positive text; image] keys, before the output projection: e.g. NAG's of Z⁺ and Z⁻, the
  attention over [negative text; image] keys with the same image keys and values;
- moves the negative's text stream through the block as the block moves the positive's: joint blocks
  (``norm1_context``, attention of its tokens over [negative text; image], ``to_add_out``, gated feed-forward
  ``ff_context``; SD3's last block only reads it), single-stream blocks (``norm``, attention, ``proj_mlp``,
  ``proj_out``, gate), with the positive's time embedding (one image, one timestep and guidance).

Two parameters cover the families: ``negative_mask`` (B, L⁻), the negative's kept text tokens when the layers
are handed a mask over [text; image] tokens (Chroma: boolean, or additive 0/1 as diffusers' pipeline gives it;
the combination is then given both text masks as logit offsets ``text_bias`` relative to the image keys), and
``text_modulation``, the part of a joint block's ``temb`` that modulates its text (Chroma: ``temb[:, 6:]``;
FLUX and SD3: all of it). The stream starts as ``context_embedder`` of the negative's T5 states; each block's
time embedding is read by a forward pre-hook. Rows of other branches (∅ at s ≠ 1) go through the layers' own
processors unchanged; the image stream is computed once: one pass a step at s = 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.layers.attention import (
    Combine,
    added_output_projection,
    is_joint_attention,
    merge_heads,
    output_projection,
    project,
    rotate,
    text_key_probabilities,
)
from negprompt.layers.processors import CallSlot, PerNegative, installed, observer_of

QUERY_CHUNK = 256  # image queries whose scores (B, H, chunk, L + N) are held at once
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # queries, keys, values, each (B, H, N, d)


# ---------------------------------------------------------------- masks


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


def _text_bias(key_mask: torch.Tensor, text_length: int) -> torch.Tensor:
    """The text keys' logit offsets (B, L) relative to the image keys', from an image query's row of a layer's
    mask over [text; image] keys (B, L + N), boolean or additive: 0 or −∞ (boolean), m_j − 1 (additive)."""
    bias = logit_bias(key_mask)
    return bias[:, :text_length] - bias[:, text_length : text_length + 1]


# ---------------------------------------------------------------- the stream and the processor


class NegativeStream:
    """One call's negative: its text stream (B, L⁻, C) through the call's blocks, its text mask, each block's time
    embedding, the positive's rows, the rule's combination and the negative's branch name (for observers)."""

    def __init__(
        self,
        transformer: Any,
        negative: torch.Tensor,
        rows: slice,
        mask: torch.Tensor | None = None,
        combine: Combine | None = None,
        branch: str = "negative",
        start: torch.Tensor | None = None,
    ) -> None:
        self.transformer = transformer
        self.negative = negative  # (B, L⁻, D) T5 states
        self.rows = rows
        self.mask = mask  # (B, L⁻) bool: the negative's kept text tokens; None: the layers get no mask
        self.combine, self.branch = combine, branch
        self.stream: torch.Tensor | None = start  # context_embedder(negative) where the run computed it
        self.temb: torch.Tensor | None = None  # the current block's, for the positive's rows

    def start(self) -> torch.Tensor:
        if self.stream is None:
            self.stream = self.transformer.context_embedder(self.negative)
        return self.stream

    def advance(self, stream: torch.Tensor) -> None:
        """The stream after a block (float16 clipped to its range, as the blocks clip theirs)."""
        self.stream = stream.clip(-65504, 65504) if stream.dtype == torch.float16 else stream


class JointNegativeProcessor:
    """One joint or single-stream attention layer's processor (see the module docstring), installed for a run: the
    current call's :class:`NegativeStream` is in ``slot`` (None: the call passes through to ``original``).

    An ``original`` that observes attention (capture) still sees the whole batch, and the negative's maps."""

    def __init__(
        self, original: Any, block: Any, slot: CallSlot, single: bool, text_modulation: slice | None = None
    ) -> None:
        self.original, self.block, self.slot, self.single = original, block, slot, single
        self.text_modulation = text_modulation  # the part of a joint block's temb for its text; None: all
        self.observer = observer_of(original)

    @property
    def state(self) -> NegativeStream:
        return self.slot.current

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.slot.current is None:  # a call without the negative (another group, outside its window)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
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

    def _masks(self, mask: torch.Tensor, length: int, negative_length: int, image_length: int) -> tuple:
        """From the positive rows' mask (B, 1, L + N, L + N): the positive text queries' mask, the negative's
        (B, 1, L⁻, L⁻ + N) in the call's form, its keys' (B, L⁻ + N), and both texts' logit offsets."""
        image_keep = torch.ones(mask.shape[0], image_length, dtype=torch.bool, device=mask.device)
        negative_keys = torch.cat([self.state.mask.to(mask.device), image_keep], dim=1)  # (B, L⁻ + N)
        negative_keys = negative_keys if mask.dtype == torch.bool else negative_keys.to(mask.dtype)
        negative_mask = negative_keys[:, None, :negative_length, None] * negative_keys[:, None, None, :]
        text_bias = (_text_bias(mask[:, 0, length], length), _text_bias(negative_keys, negative_length))
        return mask[:, :, :length], negative_mask, negative_keys, text_bias

    def _attend(self, positive: QKV, length: int, negative: QKV, mask: torch.Tensor | None, rotary: Any) -> QKV:
        """(positive text output, guided image output, negative text output), each (B, ·, H·d), before projections.

        ``positive``: the positive's queries, keys and values over its L = ``length`` text tokens then the image's
        (B, H, L + N, d); ``negative``: the negative text's (B, H, L, d). Tokens in FLUX's order [text; image] with
        rotary positions (FLUX, Chroma; none in SD3, whose processor orders them [image; text]: the softmax over keys
        does not depend on their order); the negative's text takes the text positions (all zero in FLUX: the
        rotation leaves text unchanged) and its keys join the positive's rotated image keys; only its text queries
        are needed (the image queries are the positive's). ``mask``: the positive rows' (B, 1, L + N, L + N) in the
        call's form, or None (then the negative is read unmasked)."""
        if negative[0].shape[2] != length:
            raise ValueError(f"the negative has {negative[0].shape[2]} text tokens and the positive {length}")
        text_rotary = None if rotary is None else (rotary[0][:length], rotary[1][:length])
        q_pos, k_pos, v_pos = rotate(positive[0], rotary), rotate(positive[1], rotary), positive[2]  # not the values
        q_neg = rotate(negative[0], text_rotary)
        k_neg = torch.cat([rotate(negative[1], text_rotary), k_pos[:, :, length:]], dim=2)
        v_neg = torch.cat([negative[2], v_pos[:, :, length:]], dim=2)
        text_mask = negative_mask = negative_keys = text_bias = None
        if mask is not None and self.state.mask is not None:
            text_mask, negative_mask, negative_keys, text_bias = self._masks(
                mask, length, length, q_pos.shape[2] - length
            )
        if self.observer is not None and self.observer.wants_context(self.state.branch):  # the negative's maps
            if self.state.mask is None:
                probabilities = text_key_probabilities(q_pos[:, :, length:], k_neg, length)
            else:
                key_mask = None if negative_keys is None else negative_keys[:, None, None, :]
                probabilities = masked_text_key_probabilities(q_pos[:, :, length:], k_neg, length, key_mask)
            self.observer.observe_context(self.state.branch, probabilities.flatten(0, 1), probabilities.shape[1])
        text_out = merge_heads(F.scaled_dot_product_attention(q_pos[:, :, :length], k_pos, v_pos, attn_mask=text_mask))
        negative_out = merge_heads(F.scaled_dot_product_attention(q_neg, k_neg, v_neg, attn_mask=negative_mask))
        keys_values = (
            q_pos[:, :, length:],
            (k_pos[:, :, :length], v_pos[:, :, :length]),
            (k_neg[:, :, :length], v_neg[:, :, :length]),
            (k_pos[:, :, length:], v_pos[:, :, length:]),
        )
        combine = self.state.combine
        image_out = combine(*keys_values) if text_bias is None else combine(*keys_values, text_bias=text_bias)
        return text_out.to(q_pos.dtype), image_out.to(q_pos.dtype), negative_out.to(q_pos.dtype)

    def _joint(
        self, attn: Any, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None, rotary: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A joint block: the positive rows' (image output, text output); moves the negative stream on."""
        block, state = self.block, self.state
        stream = state.start()
        temb = state.temb if self.text_modulation is None else state.temb[:, self.text_modulation]
        last = getattr(block, "context_pre_only", False)  # SD3's last block reads the text and ends its stream
        if last:
            norm_negative = block.norm1_context(stream, temb)
        else:
            norm_negative, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=temb)
        text_qkv, image_qkv = project(attn, text, added=True), project(attn, image, added=False)
        positive = tuple(torch.cat([t, i], dim=2) for t, i in zip(text_qkv, image_qkv))
        text_out, image_out, negative_out = self._attend(
            positive, text.shape[1], project(attn, norm_negative, added=True), mask, rotary
        )
        if not last:
            stream = stream + gate_msa.unsqueeze(1) * attn.to_add_out(negative_out)
            normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            state.advance(stream + gate_mlp.unsqueeze(1) * block.ff_context(normed))
        return output_projection(attn, image_out.contiguous()), added_output_projection(attn, text_out)

    def _single(self, attn: Any, tokens: torch.Tensor, mask: torch.Tensor | None, rotary: Any) -> torch.Tensor:
        """A single-stream block: the positive rows' output over [text; image] (no projection: the block
        projects); moves the negative stream on."""
        block, state = self.block, self.state
        stream = state.start()
        norm_negative, gate = block.norm(stream, emb=state.temb)
        positive = project(attn, tokens, added=False)  # [text; image] already
        text_out, image_out, negative_out = self._attend(
            positive, stream.shape[1], project(attn, norm_negative, added=False), mask, rotary
        )
        mlp = block.act_mlp(block.proj_mlp(norm_negative))
        state.advance(stream + gate.unsqueeze(1) * block.proj_out(torch.cat([negative_out, mlp], dim=2)))
        return torch.cat([text_out, image_out], dim=1)


class JointNegativeRun:
    """The processors of one transformer installed for a run (:func:`joint_negative_run`); :meth:`call` hands them
    one call's negative. ``context_embedder`` of a negative is computed once per run for each negative tensor (the
    loop hands the same tensor for the same inputs at every call)."""

    def __init__(self, transformer: Any) -> None:
        self.transformer = transformer
        self.slot = CallSlot()
        self._starts = PerNegative(transformer.context_embedder)  # each negative's stream start

    @contextmanager
    def call(
        self,
        rows: slice,
        negative: torch.Tensor,
        combine: Combine,
        branch: str = "negative",
        negative_mask: torch.Tensor | None = None,
    ) -> Iterator[None]:
        """For one call, the rows ``rows`` read ``negative`` (T5 states (B, L⁻, D); ``negative_mask`` (B, L⁻) bool,
        its kept tokens, where the layers are given a mask) combined by ``combine``."""
        state = NegativeStream(self.transformer, negative, rows, negative_mask, combine, branch, self._starts(negative))
        with self.slot.holding(state):
            yield


@contextmanager
def joint_negative_run(transformer: Any, text_modulation: slice | None = None) -> Iterator[JointNegativeRun]:
    """Installs a :class:`JointNegativeProcessor` on every joint attention layer of ``transformer`` (SD3.5's
    image-only ``attn2`` layers keep their processors) and forward pre-hooks that hand each block's time embedding
    to the current call's negative stream, for a run; the processors pass through at calls given no negative.
    Restores the processors and removes the hooks on exit (also on error)."""
    run = JointNegativeRun(transformer)
    slot = run.slot
    blocks: list[Any] = []

    def read_temb(module: Any, args: tuple, kwargs: dict) -> None:
        state = slot.current
        if state is not None:
            temb = kwargs["temb"] if "temb" in kwargs else args[2]
            state.temb = temb[state.rows]

    def make(path: str, original: Any) -> Any:
        if not is_joint_attention(transformer.get_submodule(path)):  # SD3.5's attn2: image self-attention
            return None
        block = transformer.get_submodule(path.removesuffix(".attn"))
        blocks.append(block)
        single = path.startswith("single_transformer_blocks.")
        return JointNegativeProcessor(original, block, slot, single, text_modulation)

    with installed(transformer, make):
        hooks = [block.register_forward_pre_hook(read_temb, with_kwargs=True) for block in blocks]
        try:
            yield run
        finally:
            for hook in hooks:
                hook.remove()


@contextmanager
def negative_in_joint_layers(
    transformer: Any,
    rows: slice,
    negative: torch.Tensor,
    combine: Combine,
    branch: str = "negative",
    negative_mask: torch.Tensor | None = None,
    text_modulation: slice | None = None,
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative (T5 states (B, L⁻, D); ``negative_mask``
    (B, L⁻) bool, its kept tokens, where the layers are given a mask) inside every joint attention layer,
    combined by ``combine`` (:func:`joint_negative_run` for one call). Restores the processors and removes the
    hooks on exit (also on error)."""
    with (
        joint_negative_run(transformer, text_modulation) as run,
        run.call(rows, negative, combine, branch, negative_mask),
    ):
        yield
