"""Stable Diffusion 3/3.5 (Esser et al. 2024): an MMDiT transformer on VAE latents, trained with flow matching.

Per prompt, as diffusers' ``StableDiffusion3Pipeline`` encodes it:

- CLIP-L (on ``text``) and CLIP-G (on ``text_2``, default ``text``): penultimate hidden states,
  concatenated on the feature axis and zero-padded to T5's width → (1, 77, D);
- T5 (on ``text``): last hidden states padded to ``max_sequence_length`` (256) tokens, or zeros
  when the model has no T5 (``text_encoder_3`` null in ``model_index.json``) → (1, 256, D);
- token states: CLIP's then T5's on the sequence axis → (1, 77 + 256, D); pooled: both CLIP
  projections concatenated → (1, 768 + 1280).

An empty negative is encoded like any prompt (no zeros). The transformer predicts the velocity
v = ε − x₀ (docs/guidance.md says which rules are exact on it); latents decode as
D(z / scaling_factor + shift_factor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.prompts import encode_prompt, encode_t5

# Image-size shift of the flow schedule, μ = a·(image tokens) + b through these two points
# (diffusers' ``calculate_shift``); used when the scheduler asks for it (``use_dynamic_shifting``).
SHIFT_POINTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.16)


def image_size_shift(tokens: int, config: Mapping[str, Any], max_shift: float) -> float:
    """μ of the time shift for an image of ``tokens`` transformer tokens: linear between (base length,
    base shift) and (max length, max shift), the scheduler config's values where it has them."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", max_shift)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return tokens * slope + base_shift - slope * base_len


def decode_shifted(components: Parts, latents: torch.Tensor) -> torch.Tensor:
    """x = D(z / scaling_factor + shift_factor), in the VAE's dtype (SD3's and FLUX's VAEs)."""
    config = components.vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    return components.vae.decode(latents.to(components.vae.dtype), return_dict=False)[0]


def text_length(components: Parts, tokenizer: Any, default: int) -> int:
    """T5's ``max_sequence_length``: the model's ``negprompt.json`` value, else ``default`` (the pipeline's),
    at most the T5 tokenizer's ``model_max_length``."""
    declared = components.declarations.max_sequence_length
    if declared is not None:
        return declared
    return int(min(default, getattr(tokenizer, "model_max_length", default) if tokenizer is not None else default))


class StableDiffusion3Family(ModelFamily):
    """SD3 and SD3.5 (StableDiffusion3Pipeline directories)."""

    name = "stable-diffusion-3"
    description = "Stable Diffusion 3 (StableDiffusion3Pipeline: an MMDiT transformer, CLIP-L, CLIP-G, T5)"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    saved_pipeline_class = "StableDiffusion3Pipeline"
    has_vae = True
    denoiser_classes = ("SD3Transformer2DModel",)
    second_prompt = True
    default_sampling = {"scale": 7.0, "steps": 28}  # StableDiffusion3Pipeline's defaults
    required_parts = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    weight_parts = ("transformer", "text_encoder", "text_encoder_2")
    optional_parts: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")  # T5: SD3 runs without it
    default_text_length: ClassVar[int] = 256

    # ---------------------------------------------------------------- prompts

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.size_conditions is not None:
            raise ConditioningError(f"{self.description} takes no size conditions; got {item!r}")
        with_t5 = components.text_encoder_3 is not None
        length = text_length(components, components.tokenizer_3, self.default_text_length)
        # CLIP reads 77 tokens; with T5 beside it a longer prompt is cut there, as the pipeline cuts it.
        first, pooled_1 = encode_prompt(
            components.tokenizer, components.text_encoder, item.text, penultimate=True, truncate=with_t5
        )
        second, pooled_2 = encode_prompt(
            components.tokenizer_2,
            components.text_encoder_2,
            item.text_2 or item.text,
            penultimate=True,
            truncate=with_t5,
        )
        if pooled_1 is None or pooled_2 is None:
            raise ConditioningError("SD3's CLIP encoders must give pooled projections (CLIPTextModelWithProjection)")
        clip = torch.cat([first, second.to(first.dtype)], dim=-1)
        width = int(components.transformer.config.joint_attention_dim)
        if with_t5:
            t5 = encode_t5(components.tokenizer_3, components.text_encoder_3, item.text, length)
        else:
            t5 = torch.zeros(1, length, width, dtype=clip.dtype, device=clip.device)
        if clip.shape[-1] > t5.shape[-1]:
            raise ConditioningError(
                f"CLIP's states are {clip.shape[-1]} wide, T5's {t5.shape[-1]}: the model's configs do not fit together"
            )
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        pooled = torch.cat([pooled_1, pooled_2.to(pooled_1.dtype)], dim=-1)
        return Conditioning(hidden, pooled)

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """CLIP-L's 77 tokens (CLIP-G's share their positions), then T5's (no tokenizer: zeros without T5)."""
        clip = int(components.tokenizer.model_max_length)
        length = text_length(components, components.tokenizer_3, self.default_text_length)
        return [(components.tokenizer, 0, clip), (components.tokenizer_3, clip, length)]

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Joint attention over [image; text] keys, CLIP's start token leading the text; one image token
        per patch of latent cells."""
        return AttentionLayout("joint", text_start_tokens=1, patch=self.patch_size(components))

    # ---------------------------------------------------------------- geometry

    def patch_size(self, components: Parts) -> int:
        """Latent cells per transformer token along each side."""
        return int(components.transformer.config.patch_size)

    def size_multiple(self, components: Parts) -> int:
        return self.latent_factor(components) * self.patch_size(components)

    def default_size(self, components: Parts) -> int:
        return int(components.transformer.config.sample_size) * self.latent_factor(components)

    def image_tokens(self, components: Parts, height: int, width: int) -> int:
        """Image tokens the transformer sees for an image of height × width pixels."""
        side = self.size_multiple(components)
        return (height // side) * (width // side)

    # ---------------------------------------------------------------- denoising

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """μ of the image-size shift when the scheduler shifts dynamically (SD3.5 configs may), else none."""
        config = components.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        return {"mu": image_size_shift(self.image_tokens(components, height, width), config, SHIFT_POINTS["max_shift"])}

    def takes_embedded_guidance(self, components: Parts) -> bool:
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
        """The transformer's velocity (B, C, h, w) for latents (B, C, h, w), as the pipeline calls it."""
        return components.transformer(
            hidden_states=latents,
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=torch.cat([row.hidden_states for row in rows]),
            pooled_projections=torch.cat([row.pooled for row in rows]),
            return_dict=False,
        )[0]

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        return decode_shifted(components, latents)
