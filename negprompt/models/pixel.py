"""Pixel-space models without a VAE (the bundled shapes-world model): the latents are the image."""

from __future__ import annotations

from negprompt.models.family import ModelFamily


class PixelFamily(ModelFamily):
    """A UNet on images in [-1, 1] with a CLIP-style text encoder; latent factor 1, no decoding."""

    name = "pixel"
    description = "a pixel-space model without a VAE (the bundled model's NegpromptPipeline)"
    pipeline_classes = ("NegpromptPipeline",)
    has_vae = False
