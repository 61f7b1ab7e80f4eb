"""A tiny Wan (2.1, or 2.2 with two experts) built from configs, with random weights and no downloads, and diffusers'
``WanPipeline`` on it.

Every part of the real model at toy size: a ``WanTransformer3DModel`` (two blocks, 3-D rotary axes, 1×2×2 patches),
a UMT5 encoder with a real Unigram ``T5TokenizerFast`` (32 tokens), an ``AutoencoderKLWan`` with Wan's causal 3-D
layout (4× in time, 8× in space; diffusers' own test sizes) and the flow-matching scheduler with a fixed shift.
With ``two_experts`` a second transformer (``transformer_2``, the low-noise expert) and ``boundary_ratio`` in the
pipeline options, as Wan 2.2 A14B's ``model_index.json`` has them.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from negprompt.models.components import Components
from negprompt.testing.tiny_mmdit import build_t5_tokenizer

TEXT_WIDTH = 32  # UMT5's width, the transformer's text_dim
LATENT_CHANNELS = 16  # AutoencoderKLWan's z_dim


def build_umt5(tokenizer: Any, width: int = TEXT_WIDTH) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder ``width`` wide over ``tokenizer``'s vocabulary (each layer its own relative bias)."""
    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def build_wan_transformer() -> WanTransformer3DModel:
    """Two blocks, 2 heads × 12 wide (rotary axes 4, 4, 4 for frames, rows, columns), 1×2×2 patches."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_wan_vae() -> AutoencoderKLWan:
    """diffusers' test VAE: base width 3, 16 latent channels, 8× in space, 4× in time (Wan's latents_mean/std)."""
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def build_tiny_wan(seed: int = 0, two_experts: bool = False, boundary_ratio: float = 0.875) -> Components:
    """Tiny Wan with weights drawn from ``seed``; with ``two_experts`` (Wan 2.2) a second transformer for the
    timesteps below ``boundary_ratio`` × 1000. Flow matching with shift 3 (Wan 2.1 480p's ``flow_shift``)."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = build_umt5(tokenizer)
    transformer = build_wan_transformer()
    transformer_2 = build_wan_transformer() if two_experts else None
    vae = build_wan_vae()
    components = Components(
        unet=None,
        transformer=transformer,
        transformer_2=transformer_2,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        source="tiny-wan-2.2" if two_experts else "tiny-wan",
        pipeline_options={"boundary_ratio": boundary_ratio} if two_experts else {},
    )
    return components.eval()


def wan_pipeline(components: Components, scheduler: Any | None = None) -> Any:
    """diffusers' ``WanPipeline`` on the same modules (``transformer_2`` and ``boundary_ratio`` where the model has
    them), with ``scheduler`` (default: a fresh copy of the model's), no progress bar."""
    from diffusers import WanPipeline

    base = components.scheduler
    pipe = WanPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.vae,
        scheduler=scheduler if scheduler is not None else type(base).from_config(base.config),
        transformer=components.transformer,
        transformer_2=components.transformer_2,
        boundary_ratio=components.pipeline_options.get("boundary_ratio"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
