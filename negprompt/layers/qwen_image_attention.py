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
its output.

NAG and VSF (:func:`qwen_negative_run`, installed once per run; :func:`negative_in_qwen_attention` for one call)
run the negative's text as a stream of its own through the blocks, as FLUX's and FLUX.2's readers do: the negative's
states through ``txt_norm`` and ``txt_in`` (once per run), then in every block the text half of the block
(``txt_norm1``/``txt_mod``, the added projections, ``to_add_out``, gated ``txt_mlp``) with the positive rows' time
embedding; its tokens attend over [negative text; image]. In the positive's rows the image queries get the rule's
combination of their attention over [text; image] (the row's text mask kept) and over [negative text; image]. The
negative's text takes the text positions of MSRoPE as the transformer gives a prompt of its length (``pos_embed``
with its own L⁻: token j on the diagonal after the image, as the positive's token j); the image keeps the call's.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.layers.attention import (
    Combine,
    attention_paths,
    merge_heads,
    output_projection,
    project,
    text_key_probabilities,
)
from negprompt.layers.processors import CallSlot, PerNegative, installed, observer_of
from negprompt.layers.readers import NegativeCaller
from negprompt.layers.text_keys import combine_texts

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
    hands a processor only the keyword arguments its signature names. An
    :class:`~negprompt.layers.processors.AttentionObserver`: NAG's and VSF's processor hands it the negative's."""

    def __init__(self, original: Any, recorder: Any, path: str) -> None:
        self.original = original
        self.recorder = recorder  # a negprompt.layers.readers.Recorder
        self.path = path

    def wants_context(self, branch: str) -> bool:
        return self.recorder.wants_context(branch)

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes the negative's (B·heads, N, L⁻), zero-padded to the capture's L text keys."""
        self.recorder.record_context(self.path, branch, padded_keys(probabilities, self.recorder.text_length), heads)

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


def padded_keys(probabilities: torch.Tensor, text_length: int) -> torch.Tensor:
    """Probabilities (…, L⁻) with zeros appended up to ``text_length`` keys (L⁻ over it raises)."""
    length = probabilities.shape[-1]
    if length > text_length:
        raise ValueError(f"the negative holds {length} text tokens, over the capture's {text_length} text keys")
    return F.pad(probabilities, (0, text_length - length))


# ---------------------------------------------------------------- NAG and VSF: the negative's own text stream


class QwenNegativeStream:
    """One call's negative: its text stream (B, L⁻, C) through the call's blocks, its MSRoPE text factors
    (L⁻, d/2), the current block's time embedding (the positive's rows), the positive's rows, the rule's
    combination and the negative's branch name (for observers)."""

    def __init__(
        self,
        transformer: Any,
        negative: torch.Tensor,
        rows: slice,
        combine: Combine | None = None,
        branch: str = "negative",
        start: torch.Tensor | None = None,
    ) -> None:
        self.transformer, self.negative, self.rows = transformer, negative, rows  # negative: (B, L⁻, D) states
        self.combine, self.branch = combine, branch
        self.stream: torch.Tensor | None = start  # txt_in(txt_norm(negative)), where the run computed it
        self.rotary: torch.Tensor | None = None  # set by the transformer's forward pre-hook
        self.temb: torch.Tensor | None = None  # set by each block's forward pre-hook

    def start(self) -> torch.Tensor:
        """The stream as the transformer starts its text: ``txt_in(txt_norm(states))``."""
        if self.stream is None:
            self.stream = self.transformer.txt_in(self.transformer.txt_norm(self.negative))
        return self.stream

    def keep(self, stream: torch.Tensor) -> None:
        self.stream = stream.clip(-65504, 65504) if stream.dtype == torch.float16 else stream


def modulated(x: torch.Tensor, parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x·(1 + scale) + shift, gate) of tokens x (B, L, C) and (shift, scale, gate) (B, 3C), as
    ``QwenImageTransformerBlock._modulate`` modulates the text stream."""
    shift, scale, gate = (p[:, None] for p in parameters.chunk(3, dim=-1))
    return x * (1 + scale) + shift, gate


class QwenNegativeProcessor:
    """One Qwen-Image attention layer's processor of NAG or VSF (see the module docstring), installed for a run: at
    a call ``slot`` holds a :class:`QwenNegativeStream`, the positive's rows are recomputed and the negative's
    stream moved through the block; other rows, and every call while ``slot`` holds none, go through
    ``original``."""

    def __init__(self, original: Any, block: Any, slot: CallSlot) -> None:
        self.original, self.block, self.slot = original, block, slot
        self.observer = observer_of(original)  # capture: sees the whole batch, and the negative's maps

    @property
    def state(self) -> QwenNegativeStream:
        return self.slot.current

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: QwenRotary | None = None,
    ) -> Any:
        if self.slot.current is None:  # a call without the negative (another group, outside its window)
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask,
                attention_mask=attention_mask,
                image_rotary_emb=image_rotary_emb,
            )
        if attention_mask is not None or encoder_hidden_states is None:
            raise ValueError("NAG and VSF on Qwen-Image read the text stream and its key mask, no attention_mask")
        rows = self.state.rows
        mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask[rows].bool()
        guided = self._joint(attn, hidden_states[rows], encoder_hidden_states[rows], mask, image_rotary_emb)
        if rows == slice(0, hidden_states.shape[0]) and self.observer is None:  # scale 1: the positive's rows only
            return guided
        out = self.original(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb,
        )
        image, text = (o.clone() for o in out)
        image[rows], text[rows] = guided
        return image, text

    def _joint(
        self, attn: Any, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None, rotary: QwenRotary | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive rows' (image output, text output) of the layer; moves the negative's stream on as
        ``QwenImageTransformerBlock`` moves its text. ``mask``: the rows' text key mask (B, L), True kept."""
        block, state = self.block, self.state
        stream = state.start()
        first, second = block.txt_mod(state.temb).chunk(2, dim=-1)
        negative_tokens, gate = modulated(block.txt_norm1(stream), first)
        q_img, k_img, v_img = project(attn, image, added=False)
        q_txt, k_txt, v_txt = project(attn, text, added=True)
        q_neg, k_neg, v_neg = project(attn, negative_tokens, added=True)
        if rotary is not None:
            q_img, k_img = rotate_complex(q_img, rotary[0]), rotate_complex(k_img, rotary[0])
            q_txt, k_txt = rotate_complex(q_txt, rotary[1]), rotate_complex(k_txt, rotary[1])
            q_neg, k_neg = rotate_complex(q_neg, state.rotary), rotate_complex(k_neg, state.rotary)
        keys, values = torch.cat([k_txt, k_img], dim=2), torch.cat([v_txt, v_img], dim=2)
        key_mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], k_img.shape[2])], 1)
        text_out = F.scaled_dot_product_attention(
            q_txt, keys, values, attn_mask=None if key_mask is None else key_mask[:, None, None, :]
        )
        negative_keys, negative_values = torch.cat([k_neg, k_img], dim=2), torch.cat([v_neg, v_img], dim=2)
        negative_out = F.scaled_dot_product_attention(q_neg, negative_keys, negative_values)
        if self.observer is not None and self.observer.wants_context(state.branch):  # the negative's maps
            probabilities = text_key_probabilities(q_img, negative_keys, k_neg.shape[2])
            self.observer.observe_context(state.branch, probabilities.flatten(0, 1), probabilities.shape[1])
        positive_bias = (
            None if mask is None else torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
        )
        image_out = combine_texts(
            state.combine, q_img, (k_txt, v_txt), (k_neg, v_neg), (k_img, v_img), (positive_bias, None)
        )
        stream = stream + gate * attn.to_add_out(merge_heads(negative_out).to(stream.dtype))
        normed, gate = modulated(block.txt_norm2(stream), second)
        state.keep(stream + gate * block.txt_mlp(normed))
        image_out = output_projection(attn, image_out.to(image.dtype).contiguous())
        return image_out, attn.to_add_out(merge_heads(text_out).to(text.dtype).contiguous())


@contextmanager
def negative_in_qwen_attention(
    transformer: Any, rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative (``negative_inputs["encoder_hidden_states"]``:
    its prompt states (B, L⁻, D)) inside every joint attention layer, combined by ``combine``
    (:func:`qwen_negative_run` for one call); processors and hooks are restored on exit (also on error)."""
    with qwen_negative_run(transformer) as call, call(rows, negative_inputs, combine, branch):
        yield


@contextmanager
def qwen_negative_run(transformer: Any) -> Iterator[NegativeCaller]:
    """Installs :class:`QwenNegativeProcessor` on every joint attention layer for a run, with forward pre-hooks that
    hand the current call's negative stream its text positions (from the call's ``img_shapes``) and each block's
    time embedding (all pass through at calls given no negative); yields what hands them one call's negative (as
    :func:`negative_in_qwen_attention` takes it). The stream's start ``txt_in(txt_norm(states))`` is computed once
    per run for each negative tensor (the loop hands the same tensor for the same inputs). Processors and hooks are
    restored on exit (also on error)."""
    slot = CallSlot()
    starts = PerNegative(lambda states: transformer.txt_in(transformer.txt_norm(states)))  # once per run
    blocks = {
        path: transformer.get_submodule(path.removesuffix(".attn")) for path in attention_paths(transformer, "joint")
    }
    signature = inspect.signature(transformer.forward)

    def read_positions(module: Any, args: tuple, kwargs: dict) -> None:
        state: QwenNegativeStream | None = slot.current
        if state is not None:
            shapes = signature.bind(*args, **kwargs).arguments["img_shapes"]
            device = state.negative.device
            state.rotary = module.pos_embed(shapes, max_txt_seq_len=state.negative.shape[1], device=device)[1]

    def read_temb(module: Any, args: tuple, kwargs: dict) -> None:
        state: QwenNegativeStream | None = slot.current
        if state is not None:
            temb = kwargs["temb"]  # the transformer calls its blocks with keywords
            state.temb = (temb.chunk(2, dim=0)[0] if module.zero_cond_t else temb)[state.rows]

    def make(path: str, original: Any) -> Any:
        return QwenNegativeProcessor(original, blocks[path], slot) if path in blocks else None

    def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
        states = negative_inputs["encoder_hidden_states"]
        return slot.holding(QwenNegativeStream(transformer, states, rows, combine, branch, starts(states)))

    hooks = [transformer.register_forward_pre_hook(read_positions, with_kwargs=True)]
    hooks += [block.register_forward_pre_hook(read_temb, with_kwargs=True) for block in blocks.values()]
    try:
        with installed(transformer, make):
            yield call
    finally:
        for hook in hooks:
            hook.remove()


class QwenImageReader:
    """The :class:`~negprompt.layers.readers.AttentionReader` of Qwen-Image: every block's joint attention layer
    (``transformer_blocks.N.attn``), read by :class:`QwenCaptureProcessor`, changed for NAG and VSF by
    :func:`qwen_negative_run` (once per run; :func:`negative_in_qwen_attention` for one call)."""

    def __init__(self) -> None:
        self.negative_in_attention = negative_in_qwen_attention
        self.negative_in_attention_run = qwen_negative_run

    def paths(self, denoiser: Any) -> list[str]:
        """``transformer_blocks.N.attn`` for every block, in order: each one's image queries read the text keys."""
        return attention_paths(denoiser, "joint")

    def capture_processor(self, path: str, original: Any, recorder: Any) -> QwenCaptureProcessor:
        return QwenCaptureProcessor(original, recorder, path)
