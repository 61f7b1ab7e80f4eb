"""A tiny Qwen-Image built from configs, with random weights and no downloads.

Every part of ``Qwen/Qwen-Image`` at toy size: the double-stream MMDiT (``QwenImageTransformer2DModel``,
MSRoPE on (frame, row, column) axes), a Qwen2.5-VL text encoder (``Qwen2_5_VLForConditionalGeneration``
with its vision tower, both tiny) behind a real byte-level BPE ``Qwen2Tokenizer`` whose vocabulary
makes the pipeline's prompt template 34 tokens long before the prompt (as the real tokenizer does:
the pipeline drops those 34), the video-style VAE (``AutoencoderKLQwenImage``: latents with a frame
axis, per-channel mean and std) and a flow-matching scheduler with Qwen-Image's dynamic exponential
shift and terminal σ. :func:`qwen_image_pipeline` puts diffusers' own ``QwenImagePipeline`` on the
same modules, the peer tests compare against.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from negprompt.models.components import Components
from negprompt.models.qwen_image import PROMPT_TEMPLATE
from negprompt.testing.tiny_sd import TINY_WORDS, byte_symbols

# The chat markers of Qwen2.5-VL's tokenizer the template uses, and the vision markers its config names.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>")
# Qwen-Image's scheduler settings (its scheduler_config.json): μ between (256 tokens, 0.5) and (8192, 0.9),
# an exponential time shift, σ stretched to end at 0.02.
QWEN_IMAGE_SCHEDULER = dict(
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
)


def _words(text: str) -> list[str]:
    """``text`` split as Qwen2's pre-tokenizer splits it, each word in the byte-level alphabet (a leading
    space is ``Ġ``, a newline ``Ċ``): the pieces BPE merges within."""
    pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(text)]


def _template_words() -> list[str]:
    """The words of the prompt template around its chat markers and the prompt's place ``{}``."""
    import re

    return [word for part in re.split(r"<\|im_(?:start|end)\|>|\{\}", PROMPT_TEMPLATE) for word in _words(part)]


def _merged(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """``symbols`` after byte-level BPE with ``merges`` (earlier merges first, as the tokenizer applies them)."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while True:
        found = [(rank[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in rank]
        if not found:
            return symbols
        _, i = min(found)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]


def build_qwen_tokenizer(folder: Path | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE ``Qwen2Tokenizer`` (about 420 tokens): every byte, the template's words and the
    tiny words (also with a leading space) whole, the chat and vision markers as special tokens; no start
    token, ``<|im_end|>`` ends, ``<|endoftext|>`` pads (Qwen2.5-VL's choices). Saved and loaded back, as a
    model folder holds it."""
    words = _template_words() + [piece for word in TINY_WORDS for piece in _words(f"{word} {word}")]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = _merged(list(word), merges)
        while len(pieces) > 1:  # a merge of lowest priority: the words before keep their tokens
            merges.append((pieces[0], pieces[1]))
            pieces = _merged(list(word), merges)
    vocab_list = byte_symbols() + ["".join(pair) for pair in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [*SPECIAL_TOKENS, *VISION_TOKENS]})
    folder = Path(folder or tempfile.mkdtemp(prefix="negprompt-tiny-qwen-"))
    tokenizer.save_pretrained(str(folder))
    return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)


def build_qwen_text_encoder(tokenizer: Any, width: int = 16) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL at toy size: a 2-layer language model ``width`` wide (2 heads of 8, multimodal rotary
    sections 1 + 1 + 2) and a 1-block vision tower."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": width,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen_vae(channels: int = 4) -> AutoencoderKLQwenImage:
    """The video VAE at toy size: 2 levels (2 px per latent cell, no time downsampling), per-channel latent
    mean and std far from (0, 1) so that decoding must use them."""
    means = [0.3, -0.5, 0.1, 0.8][:channels] + [0.0] * max(0, channels - 4)
    stds = [1.7, 0.6, 2.4, 1.1][:channels] + [1.0] * max(0, channels - 4)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=channels,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=means,
        latents_std=stds,
    )


def build_tiny_qwen_image(seed: int = 0) -> Components:
    """Tiny Qwen-Image with weights drawn from ``seed``: a 2-block MMDiT (2 heads of 16, rotary axes
    8 + 4 + 4) on 4 latent channels packed 2×2, the tiny Qwen2.5-VL (16 wide), the 2-level video VAE and
    Qwen-Image's scheduler settings."""
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = build_qwen_text_encoder(tokenizer)
    channels = 4
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * channels,
        out_channels=channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(8, 4, 4),
    )
    components = Components(
        unet=None,
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=build_qwen_vae(channels),
        source="tiny-qwen-image",
    )
    return components.eval()


def qwen_image_pipeline(components: Components, scheduler: Any | None = None) -> Any:
    """diffusers' ``QwenImagePipeline`` on the same modules (``scheduler``: default the model's), no progress bar."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=scheduler if scheduler is not None else components.scheduler,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
