"""Chroma (lodestones 2025): FLUX.1-schnell's transformer with its per-block time MLPs replaced by one distilled
modulation network, T5 alone as text encoder, real CFG with negative prompts; flow matching.

Per prompt, as diffusers' ``ChromaPipeline`` encodes it:

- token states: T5's last hidden states of ``text``, padded to ``max_sequence_length`` (512) tokens, T5 reading
  its padding masked (its tokenizer's attention mask) → (1, 512, 4096);
- a text mask (1, 512), bool, kept in ``Conditioning.extra["text_mask"]``: the prompt's tokens (with T5's end
  token) and one padding token are True, the rest of the padding False. Chroma was trained with this mask in
  the transformer's attention (the model card's "masking T5 padding tokens"); there is no pooled embedding.

The transformer (``ChromaTransformer2DModel``) reads latents packed 2×2 into tokens as FLUX's does
(:func:`negprompt.models.flux.pack`, position ids (0, row, column) per image token, zeros per text token), with
t/1000 as the only other input: its ``distilled_guidance_layer`` (the "approximator") turns t and a zero guidance
into every block's modulation vectors, the same for every prompt. :meth:`ChromaFamily.denoise` gives it the
rows' text masks, each extended over the image tokens, as ``attention_mask`` (B, L + N); each block makes the
(B, 1, L + N, L + N) mask m_i·m_j of it. Guidance is real CFG, v̂ = v_ỹ + s(v_y − v_ỹ) (rule ``sd``; ∅ is the
empty prompt), default s = 5 and 35 steps; σ runs 1 … 1/N, shifted by μ of the image's token count.

**Where diffusers departs from the model's reference, and which we follow.** The reference (lodestone-rock's
``flow``, the model's training code) gives the transformer a *boolean* mask: padding keys take no part in any
softmax. diffusers 0.42.1 gives it the mask as 0/1 in the prompt's float dtype, which scaled-dot-product
attention *adds* to the logits: padding keys keep a weight e⁻¹ of a kept key's (diffusers issue #12116, fixed by
PR #12263, broken again by PR #12508; still open in issue #13619). We follow the reference;
``ChromaFamily(additive_mask=True)`` gives the pipeline's form (``Components(…, family=ChromaFamily(
additive_mask=True))``), which equals ``ChromaPipeline``'s images. In all else (T5 with its own padding mask,
one padding token kept, σ list and shift) we follow the pipeline, which follows the reference there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from negprompt.guidance import syntax
from negprompt.layers.chroma_attention import TEXT_MASK  # a row's text mask (1, L) in Conditioning.extra
from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.flux import image_ids, pack, unpack
from negprompt.models.prompts import apply_weights, check_t5_prompt, weighted_tokens
from negprompt.models.stable_diffusion_3 import decode_shifted, image_size_shift, text_length

KEPT_PADDING = 1  # padding tokens left unmasked after the prompt's (the reference's and the pipeline's)


def encode_t5_masked(tokenizer: Any, text_encoder: Any, prompt: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's last hidden states of ``prompt`` padded to ``length`` tokens, read with the padding masked, (1, length, D),
    and the transformer's text mask (1, length), bool: the prompt's tokens and :data:`KEPT_PADDING` padding tokens.
    AUTOMATIC1111 weights scale the states as :func:`negprompt.models.prompts.encode_prompts` says; a prompt over
    ``length`` tokens is refused naming the words that would be cut."""
    check_t5_prompt(tokenizer, prompt, length)
    if syntax.has_syntax(prompt):
        ids, weights = weighted_tokens(tokenizer, prompt, length)
    else:
        ids = tokenizer([prompt], padding="max_length", max_length=length, truncation=True).input_ids[0]
        weights = None
    tokens = length - _trailing(ids, tokenizer.pad_token_id)  # the prompt's, with T5's end token
    positions = torch.arange(length)[None]
    device = text_encoder.device
    with torch.no_grad():
        hidden = text_encoder(
            torch.tensor([ids], device=device), attention_mask=(positions < tokens).long().to(device)
        )[0]
    if weights is not None:
        hidden = apply_weights(hidden, weights)
    return hidden.to(dtype=text_encoder.dtype), positions < tokens + KEPT_PADDING


def _trailing(ids: list[int], value: int) -> int:
    """How many of ``ids`` at the end equal ``value``."""
    count = 0
    while count < len(ids) and ids[-1 - count] == value:
        count += 1
    return count


def joint_mask(text_masks: torch.Tensor, image_tokens: int, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """The transformer's ``attention_mask`` (B, L + N) over [text; image] tokens: the rows' text masks (B, L), bool,
    then True for every image token. Boolean (the reference: False keys are excluded), or with ``additive`` 0/1
    in ``dtype`` as diffusers 0.42.1's ``ChromaPipeline`` gives it (added to the logits)."""
    image = torch.ones(text_masks.shape[0], image_tokens, dtype=torch.bool, device=text_masks.device)
    mask = torch.cat([text_masks, image], dim=1)
    return mask.to(dtype) if additive else mask


class ChromaFamily(ModelFamily):
    """Chroma1 and its fine-tunes (ChromaPipeline directories).

    ``additive_mask``: give the transformer the text mask as diffusers 0.42.1's pipeline does, 0/1 added to the
    attention logits, instead of the reference's boolean mask (see the module's docstring).
    """

    name = "chroma"
    description = "Chroma (ChromaPipeline: a FLUX-schnell-derived transformer with a modulation approximator, T5)"
    pipeline_classes = ("ChromaPipeline",)
    saved_pipeline_class = "ChromaPipeline"
    has_vae = True
    denoiser_classes = ("ChromaTransformer2DModel",)
    default_sampling = {"scale": 5.0, "steps": 35}  # ChromaPipeline's defaults
    required_parts = ("transformer", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("transformer", "text_encoder")
    default_text_length: ClassVar[int] = 512
    default_sample_size: ClassVar[int] = 128  # latent cells per side of ChromaPipeline's default image

    def __init__(self, additive_mask: bool = False) -> None:
        self.additive_mask = additive_mask

    # ---------------------------------------------------------------- prompts

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.text_2 is not None or item.size_conditions is not None:
            raise ConditioningError(f"{self.description} has one text encoder and no size conditions; got {item!r}")
        length = text_length(components, components.tokenizer, self.default_text_length)
        hidden, mask = encode_t5_masked(components.tokenizer, components.text_encoder, item.text, length)
        return Conditioning(hidden, extra={TEXT_MASK: mask.to(hidden.device)})

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """T5's tokens (padding included: the text mask leaves out all but one of the padding keys)."""
        return [(components.tokenizer, 0, text_length(components, components.tokenizer, self.default_text_length))]

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Joint attention over [text; image] keys as FLUX's, under the text mask: read by
        :class:`~negprompt.layers.chroma_attention.ChromaAttentionReader` (capture, NAG and VSF) in the form each
        call carries, boolean or this family's ``additive_mask``."""
        from negprompt.layers.chroma_attention import ChromaAttentionReader

        reader = ChromaAttentionReader(text_length(components, components.tokenizer, self.default_text_length))
        return AttentionLayout("joint", text_start_tokens=0, patch=2, family=self.description, reader=reader)

    # ---------------------------------------------------------------- geometry

    def latent_channels(self, components: Parts) -> int:
        """Channels before packing: the transformer's input is 4 per 2×2 patch."""
        return int(components.transformer.config.in_channels) // 4

    def size_multiple(self, components: Parts) -> int:
        """VAE factor × 2: packing needs even latent sides."""
        return self.latent_factor(components) * 2

    def default_size(self, components: Parts) -> int:
        """128 latent cells × the VAE factor: 1024 for Chroma."""
        return self.default_sample_size * self.latent_factor(components)

    def image_tokens(self, components: Parts, height: int, width: int) -> int:
        side = self.size_multiple(components)
        return (height // side) * (width // side)

    # ---------------------------------------------------------------- denoising

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """σ = 1 … 1/N evenly and μ of the image-size shift (diffusers' ``calculate_shift`` on the scheduler's
        settings), as ``ChromaPipeline`` sets them."""
        mu = image_size_shift(self.image_tokens(components, height, width), components.scheduler.config, 1.15)
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def takes_embedded_guidance(self, components: Parts) -> bool:
        """The approximator is given a guidance of 0 always: no guidance scale as an input."""
        return False

    def denoise(
        self,
        components: Parts,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        rows: list[Conditioning],
        guidance_inputs: Mapping[str, torch.Tensor],
        expert: int | None = None,
    ) -> torch.Tensor:
        """The velocity (B, C, h, w) for latents (B, C, h, w): packed, with position ids, t/1000 and each row's
        text mask over [text; image] tokens."""
        batch, _, height, width = latents.shape
        hidden = torch.cat([row.hidden_states for row in rows])
        text_masks = torch.cat([row.extra[TEXT_MASK] for row in rows])
        tokens = pack(latents)
        output = components.transformer(
            hidden_states=tokens,
            timestep=timestep.expand(batch).to(latents.dtype) / 1000,
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=hidden.dtype),
            img_ids=image_ids(height // 2, width // 2, latents.device, latents.dtype),
            attention_mask=joint_mask(text_masks, tokens.shape[1], self.additive_mask, hidden.dtype),
            return_dict=False,
        )[0]
        return unpack(output, height, width)

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        return decode_shifted(components, latents)

    def __repr__(self) -> str:
        return f"<{self.description}{', additive text mask' if self.additive_mask else ''}>"
