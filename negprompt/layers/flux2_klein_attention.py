"""Reading and changing the text attention of FLUX.2's transformer (``Flux2Transformer2DModel``; FLUX.2 [klein]).

FLUX.2 has two kinds of attention layer, both with one softmax over [text; image] keys (Esser et al. 2024,
Fig. 2) and rotary positions on four axes over [text; image] (text ids (0, 0, 0, index): unlike FLUX.1 the
text is rotated too):

- double-stream blocks (``Flux2TransformerBlock.attn``, a ``Flux2Attention``): image tokens through
  ``to_q/to_k/to_v`` (or the fused ``to_qkv``), text tokens through ``add_*_proj`` (or ``to_added_qkv``),
  RMS norms on each head, outputs ``to_out`` (image) and ``to_add_out`` (text); the block's modulation is
  shared by all blocks (``temb_mod_img``, ``temb_mod_txt``, computed once from the time embedding);
- single-stream blocks (``Flux2SingleTransformerBlock.attn``, a ``Flux2ParallelSelfAttention``): the
  "parallel" layer of ViT-22B — one projection ``to_qkv_mlp_proj`` gives q, k, v and the MLP's input, and one
  projection ``to_out`` of [attention output; SwiGLU(MLP input)] gives the block's update; its tokens already
  hold [text; image] (the text first, L tokens).

Everything is computed as diffusers' ``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor`` compute it,
here on (B, H, N, d) (diffusers keeps (B, N, H, d); the norms act on d, the rotation along the tokens).

:class:`Flux2KleinReader` (the family's :class:`~negprompt.layers.readers.AttentionReader`) gives:

- capture: :class:`Flux2CaptureProcessor` lets the layer's own processor compute its output and, beside it,
  the image-query × text-key block of softmax(q·kᵀ/√d) over ALL keys (masked keys, if a mask is given, left out);
- NAG and VSF: :func:`flux2_negative_run` (installed once per run; :func:`negative_in_flux2_attention` for one
  call) runs the negative's text as a stream of its own through the blocks (as
  :mod:`negprompt.guidance.joint_attention_processors` does for FLUX.1): in the positive's rows the image queries
  get the rule's combination of their attention over [text; image] and over [negative text; image] (one set of
  image keys and values); the negative's text tokens attend over [negative text; image] and move through each
  block as the positive's text does (double blocks: ``norm1_context``, ``to_add_out``, gated ``ff_context``;
  single blocks: the fused projections, its attention output joined to its own MLP BEFORE the shared
  ``to_out``), with the positive rows' modulation (one image, one timestep).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.layers.attention import Combine, merge_heads, rotate, text_key_probabilities
from negprompt.layers.processors import CallSlot, PerNegative, installed, observer_of
from negprompt.layers.readers import NegativeCaller

DOUBLE_LAYER, SINGLE_LAYER = "Flux2Attention", "Flux2ParallelSelfAttention"
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # queries, keys, values, each (B, H, N, d)


# ---------------------------------------------------------------- projections


def heads_of(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d) with the layer's head width ``attn.head_dim``."""
    return x.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)


def double_qkv(attn: Any, x: torch.Tensor, added: bool) -> QKV:
    """A double-stream layer's q, k, v (B, H, N, d) of tokens ``x`` (B, N, C): the text's (``added``: the added
    projections and norms) or the image's, fused projections or not, RMS norms on q and k."""
    if added:
        fused = getattr(attn, "to_added_qkv", None) if getattr(attn, "fused_projections", False) else None
        q, k, v = fused(x).chunk(3, dim=-1) if fused is not None else (p(x) for p in attn_added(attn))
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        fused = attn.to_qkv if getattr(attn, "fused_projections", False) else None
        q, k, v = fused(x).chunk(3, dim=-1) if fused is not None else (attn.to_q(x), attn.to_k(x), attn.to_v(x))
        norm_q, norm_k = attn.norm_q, attn.norm_k
    q, k, v = (heads_of(attn, t) for t in (q, k, v))
    return norm_q(q), norm_k(k), v


def attn_added(attn: Any) -> tuple[Any, Any, Any]:
    """A double-stream layer's text projections (``add_q_proj``, ``add_k_proj``, ``add_v_proj``)."""
    return attn.add_q_proj, attn.add_k_proj, attn.add_v_proj


def single_qkv_mlp(attn: Any, x: torch.Tensor) -> tuple[QKV, torch.Tensor]:
    """A single-stream (parallel) layer's q, k, v (B, H, N, d) and its MLP's input (B, N, M·2) of tokens ``x``,
    from the one fused projection ``to_qkv_mlp_proj``."""
    projected = attn.to_qkv_mlp_proj(x)
    qkv, mlp = projected.split([3 * attn.inner_dim, projected.shape[-1] - 3 * attn.inner_dim], dim=-1)
    q, k, v = (heads_of(attn, t) for t in qkv.chunk(3, dim=-1))
    return (attn.norm_q(q), attn.norm_k(k), v), mlp


def single_output(attn: Any, z: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """A single-stream layer's output to_out([Z; SwiGLU(MLP input)]): attention output Z (B, N, H·d)."""
    return attn.to_out(torch.cat([z, attn.mlp_act_fn(mlp)], dim=-1))


# ---------------------------------------------------------------- probabilities


def text_probabilities(
    query: torch.Tensor, keys: torch.Tensor, text_length: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The text-key block (B, H, N, L) of softmax(q·kᵀ/√d) over all keys [text; image], float32; queries
    (B, H, N, d), keys (B, H, L + M, d). ``attention_mask`` (bool, True = attend, or additive), broadcast to
    (B, H, N, L + M) over the image queries' rows: masked keys take no probability."""
    if attention_mask is None:
        return text_key_probabilities(query, keys, text_length)
    scores = query.float() @ keys.float().transpose(-1, -2) * query.shape[-1] ** -0.5
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask.float()
    return scores.softmax(dim=-1)[..., :text_length]


def image_rows_of_mask(attention_mask: torch.Tensor | None, text_length: int) -> torch.Tensor | None:
    """A mask over [text; image] queries (…, L + N, K) cut to the image queries' rows; a mask of one query row
    (…, 1, K) or of keys only (B, K) stays as it is (broadcast)."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:  # (B, K): per-row key mask
        return attention_mask[:, None, None, :]
    return attention_mask if attention_mask.shape[-2] == 1 else attention_mask[..., text_length:, :]


def layer_text_probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    text_length: int,
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The image-query × text-key probabilities (B·heads, N, L) of one FLUX.2 layer, float32.

    ``hidden_states``: the image tokens (B, N, C) of a double-stream layer (``encoder_hidden_states`` its text
    (B, L, C)), or a single-stream layer's [text; image] tokens (B, L + N, C) (``encoder_hidden_states`` None,
    L = ``text_length``); ``rotary``: (cos, sin) over [text; image] positions."""
    if encoder_hidden_states is None:
        (_, text_keys, _), _ = single_qkv_mlp(attn, hidden_states[:, :text_length])
        (query, image_keys, _), _ = single_qkv_mlp(attn, hidden_states[:, text_length:])
    else:
        _, text_keys, _ = double_qkv(attn, encoder_hidden_states, added=True)
        query, image_keys, _ = double_qkv(attn, hidden_states, added=False)
    length = text_keys.shape[2]
    keys = torch.cat([text_keys, image_keys], dim=2)
    if rotary is not None:
        keys, query = rotate(keys, rotary), rotate(query, (rotary[0][length:], rotary[1][length:]))
    probabilities = text_probabilities(query, keys, length, image_rows_of_mask(attention_mask, length))
    batch, heads, tokens = probabilities.shape[:3]
    return probabilities.reshape(batch * heads, tokens, length)


# ---------------------------------------------------------------- capture


class Flux2CaptureProcessor:
    """Wraps a FLUX.2 layer's processor: the same output, plus the image-query × text-key probabilities
    (B·heads, N, L) for the recorder. An :class:`~negprompt.layers.processors.AttentionObserver`."""

    def __init__(self, original: Any, recorder: Any, path: str, single: bool) -> None:
        self.original, self.recorder, self.path, self.single = original, recorder, path, single

    def wants_context(self, branch: str) -> bool:
        return self.recorder.wants_context(branch)

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        self.recorder.record_context(self.path, branch, probabilities, heads)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.single:  # Flux2ParallelSelfAttention calls (attn, hidden_states, attention_mask, image_rotary_emb)
            output = self.original(attn, hidden_states, *args, **kwargs)
            mask, rotary = _arguments(args, kwargs, ("attention_mask", "image_rotary_emb"))
            text, length = None, self.recorder.text_length
        else:  # Flux2Attention: (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            output = self.original(attn, hidden_states, *args, **kwargs)
            text, mask, rotary = _arguments(
                args, kwargs, ("encoder_hidden_states", "attention_mask", "image_rotary_emb")
            )
            length = text.shape[1]
        if self.recorder.active:
            probabilities = layer_text_probabilities(attn, hidden_states, text, length, rotary, mask)
            self.recorder.record(self.path, probabilities, probabilities.shape[0] // hidden_states.shape[0])
        return output


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list[Any]:
    """The processor's arguments ``names`` from its positional ``args`` (in that order) and ``kwargs``."""
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]


# ---------------------------------------------------------------- NAG and VSF


class NegativeStream:
    """One call's negative: its text stream (B, L, C) through the call's blocks, the current block's modulation,
    the positive's rows, the rule's combination and the negative's branch name (for observers)."""

    def __init__(
        self,
        transformer: Any,
        negative: torch.Tensor,
        rows: slice,
        combine: Combine | None = None,
        branch: str = "negative",
        start: torch.Tensor | None = None,
    ) -> None:
        self.transformer, self.negative, self.rows = transformer, negative, rows
        self.combine, self.branch = combine, branch
        self.stream: torch.Tensor | None = start  # context_embedder(negative), where the run computed it
        self.modulation: torch.Tensor | None = None  # the current block's text (or single-stream) modulation

    def start(self) -> torch.Tensor:
        if self.stream is None:
            self.stream = self.transformer.context_embedder(self.negative)
        return self.stream

    def parameters(self, sets: int) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
        """The current block's (shift, scale, gate) sets, each (B, 1, C), for the positive's rows
        (``Flux2Modulation.split``)."""
        mod = self.modulation
        assert mod is not None, "the block's forward pre-hook reads its modulation"
        mod = mod[:, None] if mod.ndim == 2 else mod
        mod = mod[self.rows] if mod.shape[0] > 1 else mod
        chunks = mod.chunk(3 * sets, dim=-1)
        return tuple(chunks[3 * i : 3 * i + 3] for i in range(sets))

    def keep(self, stream: torch.Tensor) -> None:
        self.stream = stream.clip(-65504, 65504) if stream.dtype == torch.float16 else stream


class Flux2NegativeProcessor:
    """One FLUX.2 layer's processor of NAG or VSF (see the module docstring), installed for a run: the current
    call's :class:`NegativeStream` is in ``slot`` (None: the call passes through to ``original``)."""

    def __init__(self, original: Any, block: Any, slot: CallSlot, single: bool) -> None:
        self.original, self.block, self.slot, self.single = original, block, slot, single
        self.observer = observer_of(original)  # capture: sees the whole batch, and the negative's maps

    @property
    def state(self) -> NegativeStream:
        return self.slot.current

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.slot.current is None:  # a call without the negative (another group, outside its window)
            return self.original(attn, hidden_states, *args, **kwargs)
        if self.single:
            mask, rotary = _arguments(args, kwargs, ("attention_mask", "image_rotary_emb"))
        else:
            text, mask, rotary = _arguments(
                args, kwargs, ("encoder_hidden_states", "attention_mask", "image_rotary_emb")
            )
        if mask is not None:
            raise ValueError("NAG and VSF on FLUX.2 read no attention mask; the pipeline passes none")
        rows = self.state.rows
        whole = rows == slice(0, hidden_states.shape[0])
        if self.single:
            guided = self._single(attn, hidden_states[rows], rotary)
        else:
            guided = self._double(attn, hidden_states[rows], text[rows], rotary)
        if whole and self.observer is None:  # one pass a step (scale 1): only the positive's rows
            return guided
        out = self.original(attn, hidden_states, *args, **kwargs)
        if self.single:
            out = out.clone()
            out[rows] = guided
            return out
        image, text_out = (o.clone() for o in out)
        image[rows], text_out[rows] = guided
        return image, text_out

    def _attend(self, text: QKV, negative: QKV, image: QKV, rotary: Any) -> tuple[torch.Tensor, ...]:
        """(positive text output, guided image output, negative text output), each (B, N, H·d), before the
        output projections. The negative's text takes the text positions (its length must be the positive's)."""
        length = text[0].shape[2]
        if negative[0].shape[2] != length:
            raise ValueError(f"the negative has {negative[0].shape[2]} text tokens and the positive {length}")
        q_pos, k_pos, v_pos = (torch.cat([t, i], dim=2) for t, i in zip(text, image))
        q_neg, k_neg, v_neg = (torch.cat([t, i], dim=2) for t, i in zip(negative, image))
        q_pos, k_pos, q_neg, k_neg = (rotate(x, rotary) for x in (q_pos, k_pos, q_neg, k_neg))  # not the values
        branch = self.state.branch
        if self.observer is not None and self.observer.wants_context(branch):  # the negative's maps
            probabilities = text_key_probabilities(q_pos[:, :, length:], k_neg, length)
            self.observer.observe_context(branch, probabilities.flatten(0, 1), probabilities.shape[1])
        text_out = merge_heads(F.scaled_dot_product_attention(q_pos[:, :, :length], k_pos, v_pos))
        image_out = self.state.combine(
            q_pos[:, :, length:],
            (k_pos[:, :, :length], v_pos[:, :, :length]),
            (k_neg[:, :, :length], v_neg[:, :, :length]),
            (k_pos[:, :, length:], v_pos[:, :, length:]),
        )
        negative_out = merge_heads(F.scaled_dot_product_attention(q_neg[:, :, :length], k_neg, v_neg))
        return text_out.to(q_pos.dtype), image_out.to(q_pos.dtype), negative_out.to(q_pos.dtype)

    def _double(
        self, attn: Any, image: torch.Tensor, text: torch.Tensor, rotary: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A double-stream block: the positive rows' (image output, text output); moves the negative stream on
        as ``Flux2TransformerBlock`` moves its text."""
        block, state = self.block, self.state
        stream = state.start()
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = state.parameters(2)
        norm_negative = block.norm1_context(stream) * (1 + scale_msa) + shift_msa
        text_out, image_out, negative_out = self._attend(
            double_qkv(attn, text, added=True),
            double_qkv(attn, norm_negative, added=True),
            double_qkv(attn, image, added=False),
            rotary,
        )
        stream = stream + gate_msa * attn.to_add_out(negative_out)
        normed = block.norm2_context(stream) * (1 + scale_mlp) + shift_mlp
        state.keep(stream + gate_mlp * block.ff_context(normed))
        return attn.to_out[1](attn.to_out[0](image_out)), attn.to_add_out(text_out)

    def _single(self, attn: Any, tokens: torch.Tensor, rotary: Any) -> torch.Tensor:
        """A single-stream block: the positive rows' output to_out([Z; MLP]) over [text; image]; moves the
        negative stream on as ``Flux2SingleTransformerBlock`` moves its tokens."""
        block, state = self.block, self.state
        stream = state.start()
        length = stream.shape[1]
        ((shift, scale, gate),) = state.parameters(1)
        norm_negative = block.norm(stream) * (1 + scale) + shift
        qkv, mlp = single_qkv_mlp(attn, tokens)
        negative, negative_mlp = single_qkv_mlp(attn, norm_negative)
        text = tuple(x[:, :, :length] for x in qkv)
        image = tuple(x[:, :, length:] for x in qkv)
        text_out, image_out, negative_out = self._attend(text, negative, image, rotary)
        state.keep(stream + gate * single_output(attn, negative_out, negative_mlp))
        return single_output(attn, torch.cat([text_out, image_out], dim=1), mlp)


def flux2_attention_paths(transformer: Any) -> list[str]:
    """Module paths, in the transformer's order, of its attention layers (all read the text)."""
    return [
        path for path, module in transformer.named_modules() if type(module).__name__ in (DOUBLE_LAYER, SINGLE_LAYER)
    ]


@contextmanager
def negative_in_flux2_attention(
    transformer: Any, rows: slice, negative_inputs: dict[str, Any], combine: Combine, branch: str = "negative"
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative (its text states (B, L, D):
    ``negative_inputs["encoder_hidden_states"]``) inside every attention layer, combined by ``combine``
    (:func:`flux2_negative_run` for one call); restores the processors and removes the hooks on exit (also on
    error)."""
    with flux2_negative_run(transformer) as call, call(rows, negative_inputs, combine, branch):
        yield


@contextmanager
def flux2_negative_run(transformer: Any) -> Iterator[NegativeCaller]:
    """Installs :class:`Flux2NegativeProcessor` on every attention layer of a FLUX.2 transformer for a run, with
    forward pre-hooks that hand each block's modulation to the current call's negative stream (both pass through
    at calls given no negative); yields what hands them one call's negative (as
    :func:`negative_in_flux2_attention` takes it). ``context_embedder`` of the negative is computed once per run
    for each negative tensor (the loop hands the same tensor for the same inputs). Restores the processors and
    removes the hooks on exit (also on error)."""
    slot = CallSlot()
    starts = PerNegative(transformer.context_embedder)  # each negative's stream start, once per run
    layers = {
        path: type(transformer.get_submodule(path)).__name__ == SINGLE_LAYER
        for path in flux2_attention_paths(transformer)
    }
    blocks = {path: transformer.get_submodule(path.removesuffix(".attn")) for path in layers}
    single_block = {block: layers[path] for path, block in blocks.items()}

    def read_modulation(module: Any, args: tuple, kwargs: dict) -> None:
        state: NegativeStream | None = slot.current
        if state is None:
            return
        name = "temb_mod" if single_block[module] else "temb_mod_txt"
        # positional: (hidden_states, encoder_hidden_states, temb_mod) or (…, temb_mod_img, temb_mod_txt)
        state.modulation = kwargs[name] if name in kwargs else args[2 if single_block[module] else 3]

    def make(path: str, original: Any) -> Any:
        return Flux2NegativeProcessor(original, blocks[path], slot, layers[path]) if path in layers else None

    def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
        states = negative_inputs["encoder_hidden_states"]
        return slot.holding(NegativeStream(transformer, states, rows, combine, branch, starts(states)))

    hooks = [block.register_forward_pre_hook(read_modulation, with_kwargs=True) for block in blocks.values()]
    try:
        with installed(transformer, make):
            yield call
    finally:
        for hook in hooks:
            hook.remove()


class Flux2KleinReader:
    """The :class:`~negprompt.layers.readers.AttentionReader` of FLUX.2's transformer."""

    def paths(self, denoiser: Any) -> list[str]:
        return flux2_attention_paths(denoiser)

    def capture_processor(self, path: str, original: Any, recorder: Any) -> Any:
        return Flux2CaptureProcessor(original, recorder, path, path.startswith("single_transformer_blocks."))

    def negative_in_attention(
        self, denoiser: Any, rows: slice, negative_inputs: dict[str, Any], combine: Combine, branch: str
    ) -> Any:
        return negative_in_flux2_attention(denoiser, rows, negative_inputs, combine, branch)

    def negative_in_attention_run(self, denoiser: Any) -> Any:
        return flux2_negative_run(denoiser)
