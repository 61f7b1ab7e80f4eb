"""The parts of a text-to-image diffusion model that the sampler needs, with their family's adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from negprompt.layers.layout import AttentionLayout
from negprompt.models.declarations import Declarations


@dataclass
class Components:
    """A denoiser (a UNet, or a transformer), a text encoder with its tokenizer, a scheduler and an optional VAE.

    ``vae`` is None for a pixel-space model (the bundled one): the UNet then works on images
    in [-1, 1] directly. ``source`` says where the parts came from (a path or a model id).
    ``family`` is the adapter of the model's family (:mod:`negprompt.models.families`); when not
    given it follows from the parts: Stable Diffusion with a VAE, the pixel family without.
    ``declarations``: what the model says of itself in its ``negprompt.json`` (default steps, scale
    and scheduler; a region finder; demo prompts), read when it is loaded; a mapping given here is
    parsed into :class:`~negprompt.models.declarations.Declarations`.
    ``text_encoder_2``/``tokenizer_2``: SDXL's second text encoder (with projection) and its tokenizer.
    ``pipeline_options``: the settings of ``model_index.json`` that are not parts, e.g. SDXL's
    ``force_zeros_for_empty_prompt``. ``embeddings``: textual-inversion embeddings loaded into the
    tokenizers, by token (see :mod:`negprompt.models.embeddings`).
    """

    unet: Any  # diffusers.UNet2DConditionModel (None for a transformer model: see ``transformer``)
    text_encoder: Any  # transformers.CLIPTextModel (or any model returning last_hidden_state)
    tokenizer: Any  # transformers tokenizer
    scheduler: Any  # a diffusers scheduler
    vae: Any | None = None  # diffusers.AutoencoderKL
    source: str = "in memory"
    family: Any = None  # negprompt.models.family.ModelFamily
    declarations: Declarations = field(default_factory=Declarations)
    text_encoder_2: Any | None = None  # transformers.CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any | None = None
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)  # token → negprompt.models.embeddings.Embedding
    transformer: Any | None = None  # diffusers.SD3Transformer2DModel or FluxTransformer2DModel (unet is None)
    text_encoder_3: Any | None = None  # transformers.T5EncoderModel (SD3)
    tokenizer_3: Any | None = None
    transformer_2: Any | None = None  # a second expert for the low-noise steps (Wan 2.2's; see its family)

    def __post_init__(self) -> None:
        self.declarations = Declarations.from_json(self.declarations)
        if self.family is None:
            from negprompt.models.families import family_for_parts

            self.family = family_for_parts(self)

    @property
    def attention_layout(self) -> AttentionLayout:
        """How the denoiser's attention layers hold the text (the family's description)."""
        return self.family.attention_layout(self)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell: 2^(number of VAE down blocks − 1), or 1 without a VAE."""
        return self.family.latent_factor(self)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this (VAE factor × UNet downsampling)."""
        return self.family.size_multiple(self)

    @property
    def default_size(self) -> int:
        return self.family.default_size(self)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self)

    @property
    def denoiser(self) -> Any:
        """The network that predicts noise or velocity: the UNet, or the transformer of an MMDiT model."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Components":
        """Moves (and casts, if ``dtype``) every module in place."""
        # Only what changes is passed: diffusers warns about float32-only modules whenever a dtype is given.
        changes = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
        for part in self.modules:
            if changes:
                part.to(**changes)
        return self

    @property
    def modules(self) -> list[Any]:
        """The parts with weights."""
        parts = (self.unet, self.transformer, self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.vae)
        parts += (self.transformer_2,)
        return [p for p in parts if p is not None]

    def eval(self) -> "Components":
        for part in self.modules:
            if part is not None:
                part.eval().requires_grad_(False)
        return self
