"""A tiny Z-Image built from configs, with random weights and no downloads.

Every part of the real model at toy size: the single-stream ``ZImageTransformer2DModel`` (noise and
context refiners, 2×2 patches, 3-axis rotary positions), a Qwen3 text encoder (``Qwen3Model``) with
a real byte-level BPE ``Qwen2Tokenizer`` carrying Qwen3's special tokens and chat template, the
FLUX-style VAE (shift and scale factors) and the flow-matching scheduler with Z-Image's shift 3.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from negprompt.models.components import Components
from negprompt.testing.tiny_mmdit import flow_vae
from negprompt.testing.tiny_sd import TINY_WORDS, byte_symbols

# Qwen3's chat template, reduced to what a list of plain messages renders to (system, user, assistant
# turns; the generation prompt; ``enable_thinking=False`` adds the empty thinking block).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, turn start, turn end (eos)
CHAT_WORDS = ("user",)  # the role of the template's prompt, one token as in Qwen's vocabulary


def _byte_level_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right, then the word after a space (``Ġ`` + ``cat``)."""
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = ["".join(pair)] + symbols[2:]
    return merges + [("Ġ", word) for word in words]


def build_qwen_tokenizer(folder: Path | None = None):
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen's pre-tokenizer) with a small vocabulary: the 256 byte
    symbols, the tiny words whole (with and without a leading space), Qwen3's special tokens (pad
    ``<|endoftext|>``, end ``<|im_end|>``, no start token), ``<think>``/``</think>`` and its chat template.
    Saved to ``folder`` (default: a temporary one) and loaded back, as a model directory holds it."""
    from transformers import Qwen2Tokenizer

    merges = _byte_level_merges(TINY_WORDS + CHAT_WORDS)
    vocab_list = byte_symbols() + ["".join(m) for m in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN3_SPECIAL_TOKENS[:2]),
        model_max_length=131072,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    folder = Path(folder or tempfile.mkdtemp(prefix="negprompt-tiny-qwen-"))
    tokenizer.save_pretrained(str(folder))
    return type(tokenizer).from_pretrained(str(folder), local_files_only=True)


def build_qwen3(tokenizer, width: int = 32) -> Qwen3Model:
    """Qwen3 at toy size: 3 layers (the pipeline reads the second-to-last), grouped-query attention."""
    return Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=width // 4,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_tiny_z_image(seed: int = 0) -> Components:
    """Tiny Z-Image with weights drawn from ``seed``: Qwen3 32 wide, a transformer 32 wide (2 heads of 16,
    rotary axes 4 + 6 + 6) with one noise-refiner, one context-refiner and two main blocks on 4 latent
    channels, FLUX's VAE factors at 2 px a latent cell, the flow-matching scheduler with shift 3."""
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = build_qwen3(tokenizer, width=32)
    channels = 4
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=channels,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    with torch.no_grad():  # the pad tokens start at zero in diffusers; draw them, as trained ones are not zero
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = flow_vae(channels, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's factors, which Z-Image uses
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    components = Components(
        unet=None,
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=vae,
        source="tiny-z-image",
    )
    return components.eval()


def z_image_pipeline(components: Components):
    """diffusers' ``ZImagePipeline`` on the same modules, without a progress bar."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(
        scheduler=type(components.scheduler).from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
