"""diffusers' own pipelines on negprompt's parts: the peers that tests and benchmarks compare against."""

from __future__ import annotations

from typing import Any

from negprompt.models.components import Components


def diffusers_pipeline(components: Components, scheduler: Any | None = None) -> Any:
    """``StableDiffusionXLPipeline`` (SDXL parts), ``StableDiffusion3Pipeline``, ``FluxPipeline`` or
    ``StableDiffusionPipeline`` on the same modules, with
    ``scheduler`` (default: the model's), no safety checker, watermark or progress bar."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler if scheduler is not None else components.scheduler
    if components.transformer is not None:
        return _transformer_pipeline(components, scheduler)
    shared = dict(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler if scheduler is not None else components.scheduler,
    )
    if components.text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(
            **shared,
            text_encoder_2=components.text_encoder_2,
            tokenizer_2=components.tokenizer_2,
            force_zeros_for_empty_prompt=components.family.zeros_empty_negatives(components),
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            **shared, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _transformer_pipeline(components: Components, scheduler: Any) -> Any:
    """``FluxPipeline`` or ``StableDiffusion3Pipeline`` on the parts, without a progress bar."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    shared = dict(
        transformer=components.transformer,
        scheduler=scheduler,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        text_encoder_2=components.text_encoder_2,
        tokenizer_2=components.tokenizer_2,
    )
    if components.family.name == "flux":
        pipe = FluxPipeline(**shared)
    else:
        pipe = StableDiffusion3Pipeline(
            **shared, text_encoder_3=components.text_encoder_3, tokenizer_3=components.tokenizer_3
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
