"""A tiny FLUX.2 [klein] built from configs, with random weights and no downloads.

Every part of the real model at toy size: a ``Flux2Transformer2DModel`` (one double-stream and two
single-stream blocks, rotary positions on four axes, no guidance input), a Qwen3 causal language model
with a REAL ``Qwen2Tokenizer`` (byte-level BPE trained here on a few words, Qwen's special tokens and a
chat template that renders a user message as Qwen3's does), the FLUX.2 VAE with random batch-norm
statistics and the flow-matching scheduler with FLUX.2's shift settings.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM

from negprompt.models.components import Components
from negprompt.testing.tiny_sd import TINY_WORDS

# Qwen3's chat template for what the pipeline renders (messages; a generation prompt; thinking off).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
TEMPLATE_WORDS = ("user", "assistant", "system")
TEXT_LAYERS = 28  # hidden states 9, 18 and 27 exist and are not the last (normed) one, as in Qwen3-4B's 36


def build_qwen_tokenizer(folder: Path | None = None, max_length: int = 48) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer trained (``tokenizers``) on the tiny words and the template's roles:
    those are whole tokens (``Ġcat``), any other text falls back to bytes; ``<|endoftext|>`` pads,
    ``<|im_start|>``/``<|im_end|>`` are special, ``<think>``/``</think>`` added, as in Qwen3's vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = TINY_WORDS + TEMPLATE_WORDS
    corpus = [" ".join(words), *words, *(f" {word}" for word in words), "\n\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_length)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    folder = Path(folder or tempfile.mkdtemp(prefix="negprompt-tiny-qwen-"))
    tokenizer.save_pretrained(str(folder))
    return Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)


def build_qwen3(tokenizer: Any, width: int = 16) -> Qwen3ForCausalLM:
    """Qwen3 at toy width with 28 layers (the pipeline reads hidden states 9, 18 and 27)."""
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )


def build_flux2_vae(latent_channels: int = 4) -> AutoencoderKLFlux2:
    """FLUX.2's VAE at toy size (2 levels: 2 px per latent cell) with random batch-norm running statistics
    over its 2×2-patchified latents, so that the normalisation is exercised."""
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def build_tiny_flux2_klein(seed: int = 0, distilled: bool = False) -> Components:
    """Tiny FLUX.2 [klein] with weights drawn from ``seed``: Qwen3 16 wide (28 layers, 48 tokens), a transformer
    with one double- and two single-stream blocks 32 wide on 16 channels (4 VAE channels patchified 2×2),
    rotary axes (4, 4, 4, 4); ``distilled``: the step-distilled form (``is_distilled`` in model_index.json)."""
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = build_qwen3(tokenizer)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_encoder.config.hidden_size,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    components = Components(
        unet=None,
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        vae=build_flux2_vae(),
        pipeline_options={"is_distilled": distilled},
        source="tiny-flux2-klein" + ("-distilled" if distilled else ""),
    )
    return components.eval()


def flux2_klein_pipeline(components: Components) -> Any:
    """diffusers' ``Flux2KleinPipeline`` on the same modules (a fresh scheduler of the model's config), no
    progress bar."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline(
        scheduler=type(components.scheduler).from_config(components.scheduler.config),
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
        is_distilled=bool(components.pipeline_options.get("is_distilled", False)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
