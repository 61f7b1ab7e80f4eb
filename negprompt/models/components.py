"""The parts of a text-to-image diffusion model that the sampler needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Components:
    """A UNet, a text encoder with its tokenizer, a scheduler and an optional VAE.

    ``vae`` is None for a pixel-space model (the bundled one): the UNet then works on images
    in [-1, 1] directly. ``source`` says where the parts came from (a path or a model id).
    """

    unet: Any  # diffusers.UNet2DConditionModel
    text_encoder: Any  # transformers.CLIPTextModel (or any model returning last_hidden_state)
    tokenizer: Any  # transformers tokenizer
    scheduler: Any  # a diffusers scheduler
    vae: Any | None = None  # diffusers.AutoencoderKL
    source: str = "in memory"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell: 2^(number of VAE down blocks − 1), or 1 without a VAE."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE factor × UNet downsampling)."""
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return self.latent_factor * unet_factor

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.latent_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: str | torch.device) -> "Components":
        for part in (self.unet, self.text_encoder, self.vae):
            if part is not None:
                part.to(device)
        return self

    def eval(self) -> "Components":
        for part in (self.unet, self.text_encoder, self.vae):
            if part is not None:
                part.eval().requires_grad_(False)
        return self
