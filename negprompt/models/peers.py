"""diffusers' own pipelines on negprompt's parts: the peers that tests and benchmarks compare against."""

from __future__ import annotations

from typing import Any

from negprompt.models.components import Components


def diffusers_pipeline(components: Components, scheduler: Any | None = None) -> Any:
    """``StableDiffusionXLPipeline`` (SDXL parts) or ``StableDiffusionPipeline`` on the same modules, with
    ``scheduler`` (default: the model's), no safety checker, watermark or progress bar."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

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
