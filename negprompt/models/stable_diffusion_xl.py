"""Stable Diffusion XL (Podell et al. 2023): two CLIP text encoders, size micro-conditions, a VAE.

Per prompt, as diffusers' ``StableDiffusionXLPipeline`` encodes it:

- token states: the penultimate hidden states of text encoder 1 (on ``text``) and of text encoder
  2 (on ``text_2``, default ``text``), concatenated on the feature axis → (1, 77, 768 + 1280);
- pooled: text encoder 2's projected pooled output (``text_embeds``), (1, 1280);
- ``time_ids``: (original height, width, crop top, left, target height, width), (1, 6);
- an empty negative (or ∅) is all zeros when the model's ``force_zeros_for_empty_prompt`` is set.

Decoding follows the pipeline: ``z / scaling_factor`` (or the VAE's latent mean and std when it
declares them), and a float16 VAE whose config sets ``force_upcast`` decodes in float32.
"""

from __future__ import annotations

import torch

from negprompt.guidance import syntax
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.prompts import encode_prompt


class StableDiffusionXLFamily(ModelFamily):
    """SDXL base and its fine-tunes (StableDiffusionXLPipeline directories)."""

    name = "stable-diffusion-xl"
    description = "Stable Diffusion XL (StableDiffusionXLPipeline: two text encoders and a VAE)"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    saved_pipeline_class = "StableDiffusionXLPipeline"
    has_vae = True
    size_conditioned = True
    default_sampling = {"scale": 5.0}  # StableDiffusionXLPipeline's guidance_scale default
    second_prompt = True
    required_parts = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    weight_parts = ("unet", "text_encoder", "text_encoder_2")

    def zeros_empty_negatives(self, components: Parts) -> bool:
        return bool(components.pipeline_options.get("force_zeros_for_empty_prompt", True))

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.size_conditions is None:
            raise ConditioningError("SDXL rows need size conditions (time ids); build inputs with the image size")
        text_2 = item.text_2 or item.text  # diffusers: prompt_2 = prompt_2 or prompt
        first, _ = encode_prompt(components.tokenizer, components.text_encoder, item.text, penultimate=True)
        second, pooled = encode_prompt(components.tokenizer_2, components.text_encoder_2, text_2, penultimate=True)
        if pooled is None:
            raise ConditioningError("text_encoder_2 gives no pooled projection; SDXL needs CLIPTextModelWithProjection")
        hidden = torch.cat([first, second], dim=-1).to(components.text_encoder_2.dtype)
        pooled = pooled.to(components.text_encoder_2.dtype)
        empty = not syntax.plain_text(item.text).strip() and not syntax.plain_text(text_2).strip()
        if item.zeros_when_empty and empty:
            hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
        self._check_added_width(components, len(item.size_conditions), pooled.shape[-1])
        time_ids = torch.tensor([list(item.size_conditions)], dtype=hidden.dtype)
        return Conditioning(hidden, pooled, {"time_ids": time_ids})

    @staticmethod
    def _check_added_width(components: Parts, count: int, pooled_width: int) -> None:
        """The UNet's added embedding must take the time ids' Fourier features and the pooled embedding."""
        unet = components.unet
        expected = unet.add_embedding.linear_1.in_features
        given = unet.config.addition_time_embed_dim * count + pooled_width
        if given != expected:
            raise ConditioningError(
                f"the UNet's added embedding takes {expected} features but {count} time ids and a pooled embedding "
                f"of {pooled_width} give {given}: the model's configs do not fit together"
            )

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z / scaling_factor) (or z·std/scaling_factor + mean), in float32 for a float16 VAE with ``force_upcast``."""
        vae = components.vae
        config = vae.config
        upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            latents = latents.to(torch.float32)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1], 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        if not upcast:
            return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        vae.to(dtype=torch.float32)  # float16 overflows in SDXL's VAE; the pipeline upcasts the same way
        try:
            return vae.decode(latents, return_dict=False)[0]
        finally:
            vae.to(dtype=torch.float16)
