"""Stable Diffusion 1.x/2.x: a CLIP text encoder, a UNet on VAE latents, a VAE decoder."""

from __future__ import annotations

import torch

from negprompt.models.family import ModelFamily, Parts


class StableDiffusionFamily(ModelFamily):
    """Latent diffusion (Rombach et al. 2022): images are decoded from latents by the VAE."""

    name = "stable-diffusion"
    description = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline with a VAE)"
    pipeline_classes = ("StableDiffusionPipeline", "NegpromptPipeline")
    has_vae = True

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z / scaling_factor), the VAE decoder in the VAE's dtype."""
        latents = latents / components.vae.config.scaling_factor
        return components.vae.decode(latents.to(components.vae.dtype), return_dict=False)[0]
