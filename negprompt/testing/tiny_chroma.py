"""A tiny Chroma built from configs, with random weights and no downloads, and diffusers' ``ChromaPipeline`` on it.

Every part of the real model at toy size: a ``ChromaTransformer2DModel`` (one joint and two single-stream blocks,
rotary axes, the modulation approximator), a T5 encoder with a real Unigram ``T5TokenizerFast`` (32 tokens),
FLUX's VAE layout with its shift and scale factors and the flow-matching scheduler with the image-size shift.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

from negprompt.models.components import Components
from negprompt.testing.tiny_mmdit import build_t5, build_t5_tokenizer, flow_vae


def build_tiny_chroma(seed: int = 0) -> Components:
    """Tiny Chroma with weights drawn from ``seed``: T5 32 wide (32 tokens), one joint and two single-stream blocks
    2 heads × 16 wide with rotary axes (4, 4, 8), an approximator 32 wide of 2 layers, 4 latent channels packed
    to 16, FLUX's VAE factors, dynamic shift (Chroma1-HD's scheduler settings)."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = build_t5(tokenizer, width=32)
    channels = 4
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=channels * 4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=2,
    )
    vae = flow_vae(channels, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's factors (Chroma's VAE is FLUX's)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    components = Components(
        unet=None,
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=vae,
        source="tiny-chroma",
    )
    return components.eval()


def chroma_pipeline(components: Components, scheduler: Any | None = None) -> Any:
    """diffusers' ``ChromaPipeline`` on the same modules, with ``scheduler`` (default: the model's), no progress bar."""
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline(
        scheduler=scheduler if scheduler is not None else components.scheduler,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
