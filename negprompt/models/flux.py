"""FLUX.1 (Black Forest Labs 2024): an MMDiT transformer with single-stream blocks on packed VAE latents, flow matching.

Per prompt, as diffusers' ``FluxPipeline`` encodes it:

- token states: T5's last hidden states of ``text_2`` (default ``text``), padded to
  ``max_sequence_length`` (512) tokens → (1, 512, 4096);
- pooled: CLIP-L's pooled output (``pooler_output``) of ``text`` → (1, 768).

The transformer reads latents packed 2×2 into tokens: (B, C, h, w) → (B, h/2·w/2, 4C), with
position ids (0, row, column) per image token and zeros per text token (rotary embeddings). The
loop keeps latents unpacked; :meth:`FluxFamily.denoise` packs and unpacks around each call, which
only permutes elements, so the scheduler's elementwise step is unchanged.

FLUX-dev is guidance-distilled: the guidance scale is an input (``guidance``, default 3.5, given as
negprompt's embedded guidance) and one pass per step suffices. A negative prompt then needs either
"true CFG" — a second pass with the negative, ε̂ = ε_ỹ + s(ε_y − ε_ỹ), diffusers' ``true_cfg_scale``
= s, negprompt's rule ``sd`` — or an attention-space rule (NAG, VSF) in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from negprompt.guidance import syntax
from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.prompts import check_prompt, encode_t5
from negprompt.models.stable_diffusion_3 import decode_shifted, image_size_shift, text_length


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): each 2×2 patch one token, as ``FluxPipeline._pack_latents``."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) → (B, C, h, w), the inverse of :func:`pack`."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def image_ids(rows: int, columns: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (0, row, column) of the packed image tokens: (rows·columns, 3)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


class FluxFamily(ModelFamily):
    """FLUX.1-dev, -schnell and their fine-tunes (FluxPipeline directories)."""

    name = "flux"
    description = "FLUX (FluxPipeline: an MMDiT transformer with single-stream blocks, CLIP-L, T5)"
    pipeline_classes = ("FluxPipeline",)
    saved_pipeline_class = "FluxPipeline"
    has_vae = True
    denoiser_classes = ("FluxTransformer2DModel",)
    second_prompt = True  # prompt_2: T5's prompt
    # FluxPipeline's defaults: 28 steps, guidance 3.5 as an input; true CFG off (s = 1: one pass per step).
    default_sampling = {"scale": 1.0, "steps": 28, "embedded_guidance": 3.5}
    required_parts = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    weight_parts = ("transformer", "text_encoder", "text_encoder_2")
    default_text_length: ClassVar[int] = 512

    # ---------------------------------------------------------------- prompts

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.size_conditions is not None:
            raise ConditioningError(f"{self.description} takes no size conditions; got {item!r}")
        length = text_length(components, components.tokenizer_2, self.default_text_length)
        hidden = encode_t5(components.tokenizer_2, components.text_encoder_2, item.text_2 or item.text, length)
        # CLIP gives only the pooled vector, of the plain text (weights act on T5's token states); a prompt
        # over its 77 tokens is cut there, as the pipeline cuts it, since T5 reads the prompt whole.
        tokenizer, encoder = components.tokenizer, components.text_encoder
        text = syntax.plain_text(item.text)
        check_prompt(tokenizer, text, check_length=False)
        tokens = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            pooled = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=False).pooler_output
        return Conditioning(hidden, pooled.to(encoder.dtype))

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """T5's tokens of ``text_2`` (default ``text``)."""
        return [(components.tokenizer_2, 0, text_length(components, components.tokenizer_2, self.default_text_length))]

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Joint attention over [text; image] keys, T5's tokens of the second prompt (no start token); each
        packed image token a 2×2 patch of latent cells."""
        return AttentionLayout("joint", text_start_tokens=0, patch=2, keys_from_second_prompt=True)

    # ---------------------------------------------------------------- geometry

    def latent_channels(self, components: Parts) -> int:
        """Channels before packing: the transformer's input is 4 per 2×2 patch."""
        return int(components.transformer.config.in_channels) // 4

    def size_multiple(self, components: Parts) -> int:
        """VAE factor × 2: packing needs even latent sides."""
        return self.latent_factor(components) * 2

    def default_size(self, components: Parts) -> int:
        """128 latent cells (FluxPipeline's default sample size) × the VAE factor: 1024 for FLUX."""
        return 128 * self.latent_factor(components)

    def image_tokens(self, components: Parts, height: int, width: int) -> int:
        side = self.size_multiple(components)
        return (height // side) * (width // side)

    # ---------------------------------------------------------------- denoising

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """σ = 1 … 1/N evenly (unless the scheduler makes its own ``use_flow_sigmas``) and μ of the image-size shift."""
        config = components.scheduler.config
        settings: dict[str, Any] = {"mu": image_size_shift(self.image_tokens(components, height, width), config, 1.15)}
        if not config.get("use_flow_sigmas"):
            settings["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        return settings

    def takes_embedded_guidance(self, components: Parts) -> bool:
        """FLUX-dev does (``guidance_embeds``), FLUX-schnell does not."""
        return bool(components.transformer.config.guidance_embeds)

    def guidance_inputs(self, components: Parts, embedded_guidance: float | None) -> dict[str, torch.Tensor]:
        """``guidance``: w as a float32 tensor (1,), as the pipeline gives it."""
        if not self.takes_embedded_guidance(components) or embedded_guidance is None:
            return super().guidance_inputs(components, embedded_guidance)  # the errors of a mismatch
        return {"guidance": torch.full([1], float(embedded_guidance), device=components.device, dtype=torch.float32)}

    def denoise(
        self,
        components: Parts,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        rows: list[Conditioning],
        guidance_inputs: Mapping[str, torch.Tensor],
        expert: int | None = None,
    ) -> torch.Tensor:
        """The velocity (B, C, h, w) for latents (B, C, h, w): packed, with position ids, t/1000 and w."""
        batch, _, height, width = latents.shape
        hidden = torch.cat([row.hidden_states for row in rows])
        guidance = guidance_inputs.get("guidance")
        tokens = components.transformer(
            hidden_states=pack(latents),
            timestep=timestep.expand(batch).to(latents.dtype) / 1000,
            guidance=None if guidance is None else guidance.expand(batch),
            pooled_projections=torch.cat([row.pooled for row in rows]),
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=hidden.dtype),
            img_ids=image_ids(height // 2, width // 2, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return unpack(tokens, height, width)

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        return decode_shifted(components, latents)
