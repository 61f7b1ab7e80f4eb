"""NAG and VSF inside joint attention (SD3, FLUX): the negative's text runs as a stream of its own beside the positive's pass.

In an MMDiT the text tokens are a stream that every block updates (Esser et al. 2024, Fig. 2); a
negative read inside attention therefore needs its own text stream through the blocks, not a fixed
context. For one denoiser call, :func:`negative_in_joint_attention` installs on every joint attention
layer of an SD3 or FLUX transformer (keyed by module path; SD3.5's
image-only ``attn2`` layers keep their processors) a processor that, for the positive branch's rows:

- gives the image queries the rule's combination in place of their attention over
  [positive text; image] keys, before the output projection: NAG's (Chen et al. 2025 §3) of Z⁺ and
  Z⁻, the attention over [negative text; image] keys with the same image keys and values; VSF's,
  the negative's text keys appended with their values' sign flipped;
- moves the negative's text stream through the block as the block moves the positive's: joint
  blocks (``norm1_context``, attention of its tokens over [negative text; image], ``to_add_out``,
  gated feed-forward ``ff_context``; SD3's last block only reads it), FLUX's single-stream blocks
  (``norm``, attention, ``proj_mlp``, ``proj_out``, gate), with the positive's time embedding (one
  image, one timestep and guidance).

The stream starts as ``context_embedder`` of the negative's T5 states. Each block's time embedding
is read by a forward pre-hook on the block; the stream lives in a :class:`NegativeStream` made for
the call. Rows of other branches (∅ at s ≠ 1) go through the layers' own processors unchanged. The
image stream is computed once: one pass a step at s = 1; the extra work is the negative's text tokens
(512 beside FLUX's 4096 image tokens at 1024²) and the second attention of the image queries.
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
    attention_paths,
    merge_heads,
    output_projection,
    project,
    rotate,
    text_key_probabilities,
)
from negprompt.layers.processors import installed, observer_of


class NegativeStream:
    """The negative's text stream (B, L⁻, C) through one call's blocks, and each block's time embedding."""

    def __init__(self, transformer: Any, negative: torch.Tensor, rows: slice) -> None:
        self.transformer = transformer
        self.negative = negative  # (B, L⁻, D) T5 states
        self.rows = rows
        self.stream: torch.Tensor | None = None
        self.temb: torch.Tensor | None = None  # the current block's, for the positive's rows

    def start(self) -> torch.Tensor:
        if self.stream is None:
            self.stream = self.transformer.context_embedder(self.negative)
        return self.stream


class JointNegativeProcessor:
    """One SD3 or FLUX joint attention layer's processor for one call (see the module docstring)."""

    def __init__(
        self, original: Any, block: Any, state: NegativeStream, combine: Combine, single: bool, branch: str
    ) -> None:
        self.original, self.block, self.state, self.combine, self.single = original, block, state, combine, single
        self.branch = branch  # the negative's branch name, for observers
        # An original that observes attention (capture) sees the whole batch, and the negative's maps.
        self.observer = observer_of(original)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        rows = self.state.rows
        whole = rows == slice(0, hidden_states.shape[0])
        if self.single:
            guided = self._single(attn, hidden_states[rows], image_rotary_emb)
        else:
            guided = self._joint(attn, hidden_states[rows], encoder_hidden_states[rows], image_rotary_emb)
        if whole and self.observer is None:  # one pass per step (scale 1): only the positive's rows
            return guided
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if self.single:
            out = out.clone()
            out[rows] = guided
            return out
        image, text = (o.clone() for o in out)
        image[rows], text[rows] = guided
        return image, text

    def _attend(
        self,
        attn: Any,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        rotary: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positive text output, guided image output, negative text output), each (B, N, H·d), before projections.

        Text and image tokens in FLUX's order [text; image] with rotary positions (FLUX; none in SD3, whose
        processor orders them [image; text]: the softmax over keys does not depend on their order); the
        negative's text takes the text positions (all zero in FLUX: the rotation leaves text unchanged)."""
        length, negative_length = text[0].shape[2], negative[0].shape[2]
        if negative_length != length:
            raise ValueError(f"the negative has {negative_length} text tokens and the positive {length}")
        q_pos, k_pos, v_pos = (torch.cat([t, i], dim=2) for t, i in zip(text, image))
        q_neg, k_neg, v_neg = (torch.cat([t, i], dim=2) for t, i in zip(negative, image))
        q_pos, k_pos, q_neg, k_neg = (rotate(x, rotary) for x in (q_pos, k_pos, q_neg, k_neg))  # not the values
        if self.observer is not None and self.observer.wants_context(self.branch):  # the negative's maps
            probabilities = text_key_probabilities(q_pos[:, :, length:], k_neg, length)
            self.observer.observe_context(self.branch, probabilities.flatten(0, 1), probabilities.shape[1])
        text_out = merge_heads(F.scaled_dot_product_attention(q_pos[:, :, :length], k_pos, v_pos))
        image_out = self.combine(
            q_pos[:, :, length:],
            (k_pos[:, :, :length], v_pos[:, :, :length]),
            (k_neg[:, :, :length], v_neg[:, :, :length]),
            (k_pos[:, :, length:], v_pos[:, :, length:]),
        )
        negative_out = merge_heads(F.scaled_dot_product_attention(q_neg[:, :, :length], k_neg, v_neg))
        return text_out.to(q_pos.dtype), image_out.to(q_pos.dtype), negative_out.to(q_pos.dtype)

    def _joint(
        self, attn: Any, image: torch.Tensor, text: torch.Tensor, rotary: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A joint block: the positive rows' (image output, text output); moves the negative stream on."""
        block, state = self.block, self.state
        stream = state.start()
        last = getattr(block, "context_pre_only", False)  # SD3's last block reads the text and ends its stream
        if last:
            norm_negative = block.norm1_context(stream, state.temb)
        else:
            norm_negative, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(stream, emb=state.temb)
        text_out, image_out, negative_out = self._attend(
            attn,
            project(attn, text, added=True),
            project(attn, norm_negative, added=True),
            project(attn, image, added=False),
            rotary,
        )
        if not last:
            stream = stream + gate_msa.unsqueeze(1) * attn.to_add_out(negative_out)
            normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
            if stream.dtype == torch.float16:
                stream = stream.clip(-65504, 65504)
            state.stream = stream
        return output_projection(attn, image_out.contiguous()), added_output_projection(attn, text_out)

    def _single(self, attn: Any, tokens: torch.Tensor, rotary: Any) -> torch.Tensor:
        """A single-stream block: the positive rows' output over [text; image] (no projection: the block
        projects); moves the negative stream on."""
        block, state = self.block, self.state
        stream = state.start()
        length = stream.shape[1]
        norm_negative, gate = block.norm(stream, emb=state.temb)
        qkv = project(attn, tokens, added=False)
        text = tuple(x[:, :, :length] for x in qkv)
        image = tuple(x[:, :, length:] for x in qkv)
        text_out, image_out, negative_out = self._attend(
            attn, text, project(attn, norm_negative, added=False), image, rotary
        )
        mlp = block.act_mlp(block.proj_mlp(norm_negative))
        stream = stream + gate.unsqueeze(1) * block.proj_out(torch.cat([negative_out, mlp], dim=2))
        if stream.dtype == torch.float16:
            stream = stream.clip(-65504, 65504)
        state.stream = stream
        return torch.cat([text_out, image_out], dim=1)


@contextmanager
def negative_in_joint_attention(
    transformer: Any, rows: slice, negative: torch.Tensor, combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """Installs :class:`JointNegativeProcessor` on every joint attention layer of an SD3 or FLUX transformer
    for one call, with forward pre-hooks that hand each block's time embedding to the negative stream;
    restores the processors and removes the hooks on exit (also on error)."""
    state = NegativeStream(transformer, negative, rows)
    blocks = {
        path: transformer.get_submodule(path.removesuffix(".attn")) for path in attention_paths(transformer, "joint")
    }

    def read_temb(module: Any, args: tuple, kwargs: dict) -> None:
        temb = kwargs["temb"] if "temb" in kwargs else args[2]
        state.temb = temb[rows]

    def make(path: str, original: Any) -> Any:
        if path not in blocks:  # SD3.5's attn2: image self-attention
            return None
        single = path.startswith("single_transformer_blocks.")
        return JointNegativeProcessor(original, blocks[path], state, combine, single, branch)

    hooks = [block.register_forward_pre_hook(read_temb, with_kwargs=True) for block in blocks.values()]
    try:
        with installed(transformer, make):
            yield
    finally:
        for hook in hooks:
            hook.remove()
