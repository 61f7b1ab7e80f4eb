"""NAG and VSF inside joint attention (SD3, FLUX): the negative's text runs as a stream of its own beside the positive's pass.

In an MMDiT the text tokens are a stream that every block updates (Esser et al. 2024, Fig. 2); a
negative read inside attention therefore needs its own text stream through the blocks, not a fixed
context. For one denoiser call, :func:`negative_in_joint_attention` installs on every joint attention
layer of an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (keyed by module path; SD3.5's
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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.guidance import formulas

KeysValues = tuple[torch.Tensor, torch.Tensor]  # keys, values (B, H, N, d)
# (query of the image tokens (B, H, N, d), positive text, negative text, image keys/values) → Z (B, N, H·d)
JointCombine = Callable[[torch.Tensor, KeysValues, KeysValues, KeysValues], torch.Tensor]


def is_joint_attention(module: Any) -> bool:
    """Whether ``module`` is an MMDiT attention layer whose keys include text tokens: SD3's joint layers
    (``Attention`` with added projections; not SD3.5's image-only ``attn2``), FLUX's joint and
    single-stream layers (``FluxAttention``)."""
    name = type(module).__name__
    if name == "FluxAttention":
        return True
    return name == "Attention" and getattr(module, "add_k_proj", None) is not None


def nag_joint_combine(phi: float, tau: float, alpha: float) -> JointCombine:
    """Z⁺ over [text; image], Z⁻ over [negative text; image], in one attention call; then
    :func:`negprompt.guidance.formulas.nag`."""

    def combine(query, text, negative, image):
        keys = torch.cat([torch.cat([text[0], image[0]], dim=2), torch.cat([negative[0], image[0]], dim=2)])
        values = torch.cat([torch.cat([text[1], image[1]], dim=2), torch.cat([negative[1], image[1]], dim=2)])
        positive, negative_out = _merge(F.scaled_dot_product_attention(torch.cat([query, query]), keys, values)).chunk(
            2
        )
        return formulas.nag(positive, negative_out, phi, tau, alpha)

    return combine


def vsf_joint_combine(scale: float, offset: float, skip: int) -> JointCombine:
    """:func:`negprompt.guidance.formulas.vsf_attention` over [text; image] keys with the negative's text
    keys appended, its first ``skip`` tokens left out (SD3: CLIP's start token, the attention sink)."""

    def combine(query, text, negative, image):
        keys, values = torch.cat([text[0], image[0]], dim=2), torch.cat([text[1], image[1]], dim=2)
        z = formulas.vsf_attention(
            query, keys, values, negative[0][:, :, skip:], negative[1][:, :, skip:], scale, offset
        )
        return _merge(z)

    return combine


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


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) → (B, N, H·d)."""
    return x.transpose(1, 2).flatten(2, 3)


def rotate(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Rotary positions on (B, H, N, d) (FLUX's ``apply_rotary_emb`` along the token axis); None: unchanged."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=2)


def project(attn: Any, x: torch.Tensor, added: bool, values: bool = True) -> tuple[torch.Tensor, ...]:
    """Queries, keys (and values) (B, H, N, d) of tokens ``x`` (B, N, C) with a joint layer's projections
    and norms: the added (text) ones of a joint layer, or ``to_q``/``to_k``/``to_v`` (image tokens, and
    every token of a single-stream layer). The norms act on d only, as in the layers' processors."""
    d = attn.to_q.out_features // attn.heads
    if added:
        q, k = attn.add_q_proj(x), attn.add_k_proj(x)
        norm_q, norm_k = getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)
    else:
        q, k = attn.to_q(x), attn.to_k(x)
        norm_q, norm_k = attn.norm_q, attn.norm_k
    q, k = _heads(q, d), _heads(k, d)
    q, k = (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k))
    if not values:
        return q, k
    return q, k, _heads((attn.add_v_proj if added else attn.to_v)(x), d)


def _logsumexp(query: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """log Σ_k exp(q·k·scale) over all keys: (B, H, N, d), (B, H, K, d) float32 → (B, H, N).

    The fused attention kernels compute this beside their output without materialising the N × K
    scores (PyTorch's flash kernel on CPU, its memory-efficient kernel on CUDA); elsewhere, or if a
    kernel refuses the inputs, the scores are computed explicitly, ``chunk`` queries at a time."""
    try:
        if query.device.type == "cpu":
            kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return kernel(query, keys, keys, 0.0, False, scale=scale)[1]
        if query.device.type == "cuda":
            kernel = torch.ops.aten._scaled_dot_product_efficient_attention
            return kernel(query, keys, keys, None, True, scale=scale)[1][..., : query.shape[2]]
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    parts = [
        torch.logsumexp(query[:, :, i : i + chunk] @ keys.transpose(-1, -2) * scale, dim=-1)
        for i in range(0, query.shape[2], chunk)
    ]
    return torch.cat(parts, dim=2)


def text_key_probabilities(query: torch.Tensor, keys: torch.Tensor, text_length: int) -> torch.Tensor:
    """The text-key block of softmax(q·kᵀ/√d) over all keys, float32: queries (B, H, N, d), keys
    [text; image] (B, H, L + M, d) → (B, H, N, L), as exp(q·k_text/√d − log Σ_all exp(q·k/√d)) (no N × K
    matrix is kept)."""
    scale = query.shape[-1] ** -0.5
    query, keys = query.float().contiguous(), keys.float().contiguous()
    text_scores = query @ keys[:, :, :text_length].transpose(-1, -2) * scale
    return (text_scores - _logsumexp(query, keys, scale)[..., None]).exp()


class JointNegativeProcessor:
    """One SD3 or FLUX joint attention layer's processor for one call (see the module docstring)."""

    def __init__(
        self, original: Any, block: Any, state: NegativeStream, combine: JointCombine, single: bool, branch: str
    ) -> None:
        self.original, self.block, self.state, self.combine, self.single = original, block, state, combine, single
        self.branch = branch  # the negative's branch name, for observers
        # An original that observes attention (capture) sees the whole batch, and the negative's maps.
        self.observer = original if getattr(original, "observes_attention", False) else None

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
        if self.observer is not None and self.observer.recorder.active:  # the negative's maps, as a branch
            probabilities = text_key_probabilities(q_pos[:, :, length:], k_neg, length)
            self.observer.recorder.record_context(
                self.observer.path, self.branch, probabilities.flatten(0, 1), probabilities.shape[1]
            )
        text_out = _merge(F.scaled_dot_product_attention(q_pos[:, :, :length], k_pos, v_pos))
        image_out = self.combine(
            q_pos[:, :, length:],
            (k_pos[:, :, :length], v_pos[:, :, :length]),
            (k_neg[:, :, :length], v_neg[:, :, :length]),
            (k_pos[:, :, length:], v_pos[:, :, length:]),
        )
        negative_out = _merge(F.scaled_dot_product_attention(q_neg[:, :, :length], k_neg, v_neg))
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
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        to_add_out = getattr(attn, "to_add_out", None)
        return image_out, text_out if to_add_out is None else to_add_out(text_out.contiguous())

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
    transformer: Any, rows: slice, negative: torch.Tensor, combine: JointCombine, branch: str = "negative"
) -> Iterator[None]:
    """Installs :class:`JointNegativeProcessor` on every joint attention layer of an SD3 or FLUX transformer
    for one call, with forward pre-hooks that hand each block's time embedding to the negative stream;
    restores the processors and removes the hooks on exit (also on error)."""
    state = NegativeStream(transformer, negative, rows)
    originals = dict(transformer.attn_processors)
    replacement, hooks = {}, []

    def read_temb(module: Any, args: tuple, kwargs: dict) -> None:
        temb = kwargs["temb"] if "temb" in kwargs else args[2]
        state.temb = temb[rows]

    for key, processor in originals.items():
        path = key.removesuffix(".processor")
        if not is_joint_attention(transformer.get_submodule(path)):  # SD3.5's attn2: image self-attention
            replacement[key] = processor
            continue
        block_path = path.removesuffix(".attn")
        block = transformer.get_submodule(block_path)
        single = block_path.startswith("single_transformer_blocks.")
        replacement[key] = JointNegativeProcessor(processor, block, state, combine, single, branch)
        hooks.append(block.register_forward_pre_hook(read_temb, with_kwargs=True))
    transformer.set_attn_processor(replacement)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        transformer.set_attn_processor(originals)
