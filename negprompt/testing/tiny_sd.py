"""A tiny Stable Diffusion built from configs, with random weights and no downloads.

It has every part of SD 1.x (VAE, UNet with cross-attention, CLIP text encoder with a real
byte-level BPE ``CLIPTokenizer``, PNDM scheduler) at toy sizes, so the tests and benchmarks can
exercise Stable Diffusion code paths offline. ``unet_preset="sd15"`` builds a full-size SD 1.5 UNet
(random weights) for speed measurements.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from negprompt.models.components import Components

# The noise schedule of SD 1.x and SDXL (their scheduler configs).
SD_NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
# Merges give whole-word tokens for these words; other words split into several tokens.
TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "hat", "with", "glasses", "woman", "in", "the", "street")


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: one printable unicode character per byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes))]


def _merges_for(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right, ending in its ``</w>`` form."""
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = ["".join(pair)] + symbols[2:]
    return merges


def build_clip_tokenizer(
    folder: Path | None = None, max_length: int = 77, pad_token: str | None = None
) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with a small vocabulary (about 560 tokens); ``pad_token``: e.g. "!"
    as SDXL's second tokenizer pads (default: the end token)."""
    base = byte_symbols()
    merges = _merges_for(TINY_WORDS)
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    folder = Path(folder or tempfile.mkdtemp(prefix="negprompt-tiny-clip-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length}
    if pad_token is not None:
        config["pad_token"] = pad_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(str(folder))


def build_vae(tiny: bool, sample_size: int | None = None, latent_channels: int = 4, **config) -> AutoencoderKL:
    """SD's VAE at toy size (2 levels, 16–32 channels: 2 px per latent cell) or full size (4 levels: 8 px)."""
    levels = 2 if tiny else 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16, 32) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        latent_channels=latent_channels,
        norm_num_groups=8 if tiny else 32,
        sample_size=sample_size or (32 if tiny else 512),
        **config,
    )


def build_tiny_sd(seed: int = 0, unet_preset: str = "tiny", with_vae: bool = True) -> Components:
    """Tiny SD components with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32 if unet_preset == "tiny" else 768,
            intermediate_size=64 if unet_preset == "tiny" else 3072,
            num_hidden_layers=2 if unet_preset == "tiny" else 12,
            num_attention_heads=4 if unet_preset == "tiny" else 12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    if unet_preset == "tiny":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
    elif unet_preset == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.5's
    else:
        raise ValueError(f"unknown unet preset {unet_preset!r}; choose 'tiny' or 'sd15'")
    vae = build_vae(unet_preset == "tiny") if with_vae else None
    scheduler = PNDMScheduler(
        **SD_NOISE_SCHEDULE,
        skip_prk_steps=True,
        set_alpha_to_one=False,
    )
    components = Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=vae,
        source=f"tiny-sd:{unet_preset}",
    )
    return components.eval()


def clip_config(tokenizer: CLIPTokenizer, width: int, layers: int, heads: int, projection: int = 512) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(seed: int = 0, unet_preset: str = "tiny") -> Components:
    """Tiny SDXL components with weights drawn from ``seed``: two CLIP text encoders (the second with a
    projection, its tokenizer padding with "!"), a UNet with ``text_time`` added conditioning and
    cross-attention at two resolutions, a VAE that asks for float32 decoding, Euler scheduler.

    ``unet_preset="sdxl"`` builds SDXL-base sizes (CLIP ViT-L and bigG encoders, the 2.6 B UNet,
    the VAE) with random weights, for speed measurements (speed does not depend on the weights).
    """
    if unet_preset not in ("tiny", "sdxl"):
        raise ValueError(f"unknown unet preset {unet_preset!r}; choose 'tiny' or 'sdxl'")
    torch.manual_seed(seed)
    tiny = unet_preset == "tiny"
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    widths = (32, 32) if tiny else (768, 1280)
    text_encoder = CLIPTextModel(clip_config(tokenizer, widths[0], 2 if tiny else 12, 4 if tiny else 12))
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_config(tokenizer_2, widths[1], 2 if tiny else 32, 4 if tiny else 20, projection=widths[1])
    )
    time_dim = 8 if tiny else 256
    unet = UNet2DConditionModel(
        sample_size=16 if tiny else 128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64) if tiny else (320, 640, 1280),
        layers_per_block=1 if tiny else 2,
        attention_head_dim=(2, 4, 8) if tiny else (5, 10, 20),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2) if tiny else (1, 2, 10),
        cross_attention_dim=sum(widths),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + widths[1],
        norm_num_groups=8 if tiny else 32,
    )
    vae = build_vae(tiny, sample_size=32 if tiny else 1024, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        **SD_NOISE_SCHEDULE,
        timestep_spacing="leading",
        interpolation_type="linear",
    )
    components = Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=vae,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        source=f"tiny-sdxl:{unet_preset}",
        pipeline_options={"force_zeros_for_empty_prompt": True},
    )
    return components.eval()
