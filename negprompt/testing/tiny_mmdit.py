"""Tiny Stable Diffusion 3 and FLUX built from configs, with random weights and no downloads.

Every part of the real models at toy sizes — MMDiT transformers (SD3's joint blocks; FLUX's
joint and single-stream blocks with rotary positions and a guidance input), CLIP encoders with
real BPE tokenizers, a T5 encoder with a real Unigram tokenizer, the flow-matching scheduler
with the models' shift settings, VAEs with shift and scale factors — so tests and benchmarks
exercise the SD3 and FLUX code paths offline. ``preset="full"`` builds real-size transformers
(random weights) for speed measurements on a GPU; their text encoders stay tiny (speed of the
loop does not depend on them).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from negprompt.models.components import Components
from negprompt.testing.tiny_sd import TINY_WORDS, build_clip_tokenizer, build_vae, clip_config

T5_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-():"


def build_t5_tokenizer(folder: Path | None = None, max_length: int = 32):
    """A SentencePiece-style Unigram T5 tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the tiny words
    whole (``▁cat``), any other word spelled letter by letter; an end token after each text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -1.0) for word in TINY_WORDS] + [("▁", -2.0)]
    pieces += [(letter, -3.0) for letter in T5_LETTERS]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Replace(" {2,}", " ")
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=model,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )
    folder = Path(folder or tempfile.mkdtemp(prefix="negprompt-tiny-t5-"))
    tokenizer.save_pretrained(str(folder))
    return type(tokenizer).from_pretrained(str(folder), local_files_only=True)


def build_t5(tokenizer, width: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def flow_vae(channels: int, scaling_factor: float, shift_factor: float):
    """The toy VAE with SD3's and FLUX's layout: a shift and a scale of the latents, no quant convolutions."""
    return build_vae(
        True,
        latent_channels=channels,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_sd3(seed: int = 0, preset: str = "tiny", with_t5: bool = True) -> Components:
    """Tiny SD3 with weights drawn from ``seed``: CLIP-L/-G with projections (16 wide each, pooled 2×32),
    T5 32 wide (32 tokens), a 2-block MMDiT with 2×2 patches on 4 latent channels, shift 3.

    ``preset="sd3-medium"`` builds SD3-medium's transformer size (24 joint blocks, 1536 wide, 16 latent
    channels; about 2 B parameters) with tiny text encoders, for GPU speed measurements."""
    if preset not in ("tiny", "sd3-medium"):
        raise ValueError(f"unknown preset {preset!r}; choose 'tiny' or 'sd3-medium'")
    torch.manual_seed(seed)
    tiny = preset == "tiny"
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, 16, 2, 2, projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, 16, 2, 2, projection=32))
    tokenizer_3 = build_t5_tokenizer() if with_t5 else None
    text_encoder_3 = build_t5(tokenizer_3, width=32 if tiny else 64) if with_t5 else None
    channels = 4 if tiny else 16
    transformer = SD3Transformer2DModel(
        sample_size=16 if tiny else 128,
        patch_size=2,
        in_channels=channels,
        out_channels=channels,
        num_layers=2 if tiny else 24,
        attention_head_dim=8 if tiny else 64,
        num_attention_heads=4 if tiny else 24,
        joint_attention_dim=32 if tiny else 64,
        caption_projection_dim=32 if tiny else 1536,
        pooled_projection_dim=64,
        pos_embed_max_size=32 if tiny else 192,
    )
    vae = flow_vae(channels, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's factors
    components = Components(
        unet=None,
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        source=f"tiny-sd3:{preset}",
    )
    return components.eval()


def build_tiny_flux(seed: int = 0, preset: str = "tiny", guidance_embeds: bool = True) -> Components:
    """Tiny FLUX with weights drawn from ``seed``: CLIP-L 32 wide (pooled), T5 32 wide (32 tokens), one
    joint and two single-stream blocks with rotary axes (4, 4, 8), 4 latent channels packed to 16,
    a guidance input (FLUX-dev; ``guidance_embeds=False``: FLUX-schnell's form), dynamic shift.

    ``preset="flux-dev"`` builds FLUX-dev's transformer size (19 joint and 38 single blocks, 3072 wide;
    about 12 B parameters) with tiny text encoders, for GPU speed measurements."""
    if preset not in ("tiny", "flux-dev"):
        raise ValueError(f"unknown preset {preset!r}; choose 'tiny' or 'flux-dev'")
    torch.manual_seed(seed)
    tiny = preset == "tiny"
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(clip_config(tokenizer, 32, 2, 4))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = build_t5(tokenizer_2, width=32)
    channels = 4 if tiny else 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=channels * 4,
        num_layers=1 if tiny else 19,
        num_single_layers=2 if tiny else 38,
        attention_head_dim=16 if tiny else 128,
        num_attention_heads=2 if tiny else 24,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8) if tiny else (16, 56, 56),
    )
    vae = flow_vae(channels, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's factors
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
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        vae=vae,
        source=f"tiny-flux:{preset}",
    )
    return components.eval()
