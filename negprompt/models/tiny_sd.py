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
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from negprompt.models.components import Components

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


def build_clip_tokenizer(folder: Path | None = None, max_length: int = 77) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with a small vocabulary (about 560 tokens)."""
    base = byte_symbols()
    merges = _merges_for(TINY_WORDS)
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    folder = Path(folder or tempfile.mkdtemp(prefix="negprompt-tiny-clip-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length})
    )
    return CLIPTokenizer.from_pretrained(str(folder))


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
    vae = None
    if with_vae:
        levels = 2 if unet_preset == "tiny" else 4
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(16, 32) if unet_preset == "tiny" else (128, 256, 512, 512),
            layers_per_block=1 if unet_preset == "tiny" else 2,
            latent_channels=4,
            norm_num_groups=8 if unet_preset == "tiny" else 32,
            sample_size=32 if unet_preset == "tiny" else 512,
        )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
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
