"""Wan 2.1 and Wan 2.2 text-to-video (Wan team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models"):
a video transformer over 3-D patches of a causal video VAE's latents, UMT5 as the text encoder, flow matching.

Per prompt, as diffusers' ``WanPipeline`` encodes it (its own ``prompt_clean`` first: HTML entities resolved, runs
of white space made one space): UMT5's last hidden states of the prompt padded to ``max_sequence_length`` (512)
tokens, read with the tokenizer's attention mask, then every state past the prompt's tokens (its end token
included) set to zero → (1, 512, 4096). The transformer takes no text mask: the zero states are keys like any other.
AUTOMATIC1111 weights scale the prompt's states before the zeroing (:func:`negprompt.models.prompts.apply_weights`):
the transformer's text embedder is an MLP with no per-token normalisation first, so a weight acts.

A video of F frames has latents (B, C, F', h, w) with F' = (F − 1)/4 + 1: the VAE keeps the first frame alone and
packs every 4 after it into one latent frame, so F must be 4k + 1 (the pipeline rounds other counts down with a
warning; :meth:`WanFamily.check_video` refuses them naming the nearest two). Decoded frames come out as
(B, F, H, W, 3) float32 in [0, 1], as the pipeline's ``output_type="np"``.

Guidance is CFG with the negative prompt as the unconditional branch, v̂ = v_ñ + g(v_y − v_ñ): rule ``sd``. Wan 2.2
A14B has two experts: ``transformer`` for the high-noise timesteps t ≥ ``boundary_ratio`` × 1000 and
``transformer_2`` below, each with its own scale (``guidance_scale``, ``guidance_scale_2``): :meth:`expert_at`
tells the loop which expert a step runs on, and the second's steps run at the run's ``scale_2`` (None: the first's
scale, the pipeline's default). The scheduler's timesteps are set with the step count alone, as
the pipeline sets them: its configured shift is the whole of the schedule. Wan 2.2 TI2V-5B (``expand_timesteps``:
one timestep per latent token) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from negprompt.guidance import syntax
from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts, VideoSettingsError, check_second_scale
from negprompt.models.prompts import apply_weights, check_t5_prompt, weighted_tokens
from negprompt.models.stable_diffusion_3 import text_length


def clean_prompt(prompt: str) -> str:
    """The text ``WanPipeline`` encodes: diffusers' own ``prompt_clean`` (ftfy's repairs where it is installed,
    HTML entities resolved twice, white space collapsed and stripped)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(prompt)


def encode_umt5(tokenizer: Any, text_encoder: Any, prompt: str, length: int) -> torch.Tensor:
    """UMT5's last hidden states of ``prompt`` (cleaned as the pipeline cleans it) padded to ``length`` tokens, read
    with the padding masked, zero past the prompt's tokens: (1, length, D), as ``WanPipeline._get_t5_prompt_embeds``.
    A prompt over ``length`` tokens is refused naming the words that would be cut."""
    prompt = clean_prompt(prompt)
    check_t5_prompt(tokenizer, prompt, length)
    if syntax.has_syntax(prompt):
        ids, weights = weighted_tokens(tokenizer, prompt, length)
    else:
        ids = tokenizer([prompt], padding="max_length", max_length=length, truncation=True).input_ids[0]
        weights = None
    tokens = len(ids) - _trailing(ids, tokenizer.pad_token_id)  # the prompt's, with the end token
    mask = (torch.arange(length) < tokens).long()[None]
    device = text_encoder.device
    with torch.no_grad():
        hidden = text_encoder(torch.tensor([ids], device=device), attention_mask=mask.to(device))[0]
    if weights is not None:
        hidden = apply_weights(hidden, weights)
    hidden = hidden * mask[..., None].to(hidden.device, hidden.dtype)  # the pipeline's zeros past the prompt
    return hidden.to(dtype=text_encoder.dtype)


def _trailing(ids: list[int], value: int) -> int:
    """How many of ``ids`` at the end equal ``value``."""
    count = 0
    while count < len(ids) and ids[-1 - count] == value:
        count += 1
    return count


def nearest_frame_counts(frames: int, factor: int) -> tuple[int, int]:
    """The frame counts k·``factor`` + 1 nearest ``frames`` ≥ 1: the one below and the one above."""
    below = (frames - 1) // factor * factor + 1
    return below, below + factor


class WanFamily(ModelFamily):
    """Wan 2.1 and Wan 2.2 text-to-video (WanPipeline directories), with Wan 2.2's second expert where it has one."""

    name = "wan"
    description = "Wan 2.1/2.2 text-to-video (WanPipeline: a video transformer, UMT5, a causal video VAE)"
    pipeline_classes = ("WanPipeline",)
    saved_pipeline_class = "WanPipeline"
    has_vae = True
    makes_video: ClassVar[bool] = True
    decodes_causally: ClassVar[bool] = True  # its causal 3-D VAE (tests/test_timeline_frames.py checks it)
    denoiser_classes = ("WanTransformer3DModel",)
    default_sampling = {"scale": 5.0, "steps": 50, "frames": 81}  # WanPipeline's defaults
    required_parts = ("transformer", "text_encoder", "tokenizer", "scheduler")
    optional_parts = ("transformer_2",)  # Wan 2.2 A14B's low-noise expert
    weight_parts = ("transformer", "text_encoder")
    default_text_length: ClassVar[int] = 512  # the pipeline's max_sequence_length
    default_side: ClassVar[int] = 480  # the short side of the pipeline's 480 × 832 default

    # ---------------------------------------------------------------- prompts

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.text_2 is not None or item.size_conditions is not None:
            raise ConditioningError(f"{self.description} has one text encoder and no size conditions; got {item!r}")
        length = text_length(components, components.tokenizer, self.default_text_length)
        return Conditioning(encode_umt5(components.tokenizer, components.text_encoder, item.text, length))

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """UMT5's tokens, padded (zero states) to ``max_sequence_length``."""
        return [(components.tokenizer, 0, text_length(components, components.tokenizer, self.default_text_length))]

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Cross-attention (each block's ``attn2``) of the video tokens on the text, read by
        :class:`~negprompt.layers.wan_attention.WanAttentionReader` (no start token leads UMT5's keys)."""
        from negprompt.layers.wan_attention import WanAttentionReader

        patch = int(components.transformer.config.patch_size[1])
        return AttentionLayout(
            "cross", text_start_tokens=0, patch=patch, frames=True, family=self.description, reader=WanAttentionReader()
        )

    # ---------------------------------------------------------------- geometry

    def latent_factor(self, components: Parts) -> int:
        """Pixels per latent cell in each spatial direction: the VAE's ``scale_factor_spatial`` (8)."""
        return int(components.vae.config.scale_factor_spatial)

    def temporal_factor(self, components: Parts) -> int:
        """Frames per latent frame after the first: the VAE's ``scale_factor_temporal`` (4)."""
        return int(components.vae.config.scale_factor_temporal)

    def size_multiple(self, components: Parts) -> int:
        """VAE factor × the transformer's spatial patch (16 for Wan 2.1 and 2.2 A14B, as the pipeline checks)."""
        _, rows, columns = components.transformer.config.patch_size
        return self.latent_factor(components) * math.lcm(int(rows), int(columns))

    def default_size(self, components: Parts) -> int:
        return self.default_side

    def latent_shape(self, components: Parts, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        """(C, F', h, w) of one video of ``frames`` frames: F' = (frames − 1)/4 + 1 latent frames."""
        factor = self.latent_factor(components)
        latent_frames = (frames - 1) // self.temporal_factor(components) + 1
        return (self.latent_channels(components), latent_frames, height // factor, width // factor)

    def check_video(self, components: Parts, frames: int, scale: float, scale_2: float | None) -> None:
        """Frame counts the VAE takes: k × 4 + 1; a second scale for Wan 2.2's second expert only. Also refuses
        Wan 2.2 TI2V (``expand_timesteps``), which this adapter does not run."""
        if components.pipeline_options.get("expand_timesteps"):
            raise VideoSettingsError(
                f"{components.source} is a Wan 2.2 TI2V model (expand_timesteps: a timestep per latent token), which "
                "negprompt does not run yet; Wan 2.1 and Wan 2.2 T2V A14B models are supported"
            )
        factor = self.temporal_factor(components)
        if (frames - 1) % factor:
            nearest = " or ".join(str(n) for n in nearest_frame_counts(frames, factor))
            raise VideoSettingsError(
                f"frames {frames}: Wan makes {factor}k + 1 frames (its VAE packs each {factor} frames after the "
                f"first into one latent frame); the nearest counts are {nearest}"
            )
        check_second_scale(components, self.expert_at, scale, scale_2)

    # ---------------------------------------------------------------- denoising

    def boundary_timestep(self, components: Parts) -> float | None:
        """t where the second expert takes over: ``boundary_ratio`` × the schedule's training timesteps; None for a
        model with one transformer (Wan 2.1), or without a boundary (the pipeline then runs ``transformer`` alone)."""
        ratio = components.pipeline_options.get("boundary_ratio")
        if ratio is None or components.transformer_2 is None:
            return None
        return float(ratio) * float(components.scheduler.config.num_train_timesteps)

    def expert_at(self, components: Parts, timestep: torch.Tensor | float) -> int:
        """1 (``transformer_2``) for t below the boundary, else 0 (``transformer``), as the pipeline picks."""
        boundary = self.boundary_timestep(components)
        return 0 if boundary is None or float(timestep) >= boundary else 1

    def denoiser_at(self, components: Parts, timestep: torch.Tensor | float) -> Any:
        return components.transformer_2 if self.expert_at(components, timestep) else components.transformer

    def denoisers(self, components: Parts) -> list[Any]:
        """``transformer``, then Wan 2.2's ``transformer_2`` where the model has one."""
        return [components.transformer] + ([] if components.transformer_2 is None else [components.transformer_2])

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """None: ``WanPipeline`` sets the step count alone, the scheduler's configured shift does the rest."""
        return {}

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
        """The velocity (B, C, F', h, w) for latents (B, C, F', h, w), from the expert of this timestep, each row
        conditioned on its UMT5 states (B, L, D). ``expert``: 0 or 1 as the loop picked it before the run (None:
        picked here from ``timestep``, a host sync on a device)."""
        transformer = self.denoiser_at(components, timestep) if expert is None else self.denoisers(components)[expert]
        hidden = torch.cat([row.hidden_states for row in rows]).to(transformer.dtype)
        return transformer(
            hidden_states=latents.to(transformer.dtype),
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=hidden,
            return_dict=False,
        )[0]

    # ---------------------------------------------------------------- frames

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, F', h, w) → frames (B, 3, F, H, W) in [-1, 1]: un-normalised with the VAE's per-channel
        ``latents_mean``/``latents_std``, then decoded, as the pipeline does."""
        vae = components.vae
        latents = latents.to(vae.device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return vae.decode(latents / inverse_std + mean, return_dict=False)[0]

    def decode(self, components: Parts, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, F', h, w) → frames (B, F, H, W, 3) float32 in [0, 1]."""
        with torch.no_grad():
            video = self.to_pixels(components, latents)
        video = (video / 2 + 0.5).clamp(0, 1)
        return video.cpu().permute(0, 2, 3, 4, 1).float().numpy()
