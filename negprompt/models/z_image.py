"""Z-Image (Tongyi-MAI 2025): a single-stream diffusion transformer on FLUX-style VAE latents, flow matching.

**Prompts.** As diffusers' ``ZImagePipeline`` encodes one prompt: the text is wrapped in the
tokenizer's chat template (one user message, generation prompt, ``enable_thinking=True``: for Qwen3
``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``), tokenized and padded to
``max_sequence_length`` (512), and the Qwen3 text encoder reads it with its attention mask; the
hidden states of its *second-to-last* layer at the unmasked tokens are the prompt's embedding,
(L, D) with L the templated prompt's token count — a different length for every prompt. A
:class:`~negprompt.models.conditioning.Conditioning` holds them as (1, L, D), without padding.
AUTOMATIC1111 prompt editing (``[a:b:N]``) works as on every family; weights other than 1 are refused:
the transformer's caption embedder RMS-normalises each token's state, so scaling it (AUTOMATIC1111's
form of a weight) would change nothing.
A prompt whose templated tokens exceed the limit is refused, naming the words the pipeline would cut.

**Denoiser.** ``ZImageTransformer2DModel(x, t, cap_feats)`` takes lists, one entry per row: latents
(C, 1, h, w) (a frame axis), and the caption states (L_i, D); it patchifies 2×2, pads each image's
and caption's tokens to a multiple of 32 and the batch to its longest sequence (with an attention
mask), refines image tokens and caption tokens apart (``noise_refiner``, ``context_refiner``), then
runs the joined sequence [image; caption] through single-stream blocks. ``t`` is 1 − σ (the
pipeline's (1000 − t)/1000): the model counts time from noise to data, and its output is
x₀ − ε, the negative of the velocity v = ε − x₀ negprompt's flow-matching loop uses, so
:meth:`ZImageFamily.denoise` returns its negation (as the pipeline negates it before the
scheduler). Rows of one call are passed as such a list, exactly as the pipeline passes them.

**Schedule.** σ = 1 … 1/N evenly (the pipeline's ``get_default_z_image_sigmas``) through the
scheduler's shift (3 for Z-Image), and μ of the image-size shift (used only by a scheduler with
``use_dynamic_shifting``).

**Guidance.** The pipeline's CFG is v̂ = v_y + g(v_y − v_ỹ), the empty prompt standing in for a
missing negative: negprompt's rule ``sd`` at s = g + 1 (g = 0, "off", is s = 1: one pass a
step). Its options: ``cfg_normalization`` k caps ‖v̂‖ at k‖v_y‖ per image — rule ``cfg-renorm``
(:mod:`negprompt.guidance.rules.cfg_renorm`); ``cfg_truncation`` c switches guidance off (the
positive alone, one pass) at the steps whose normalised time (1000 − t)/1000 exceeds c — a
prefix of the schedule, negprompt's guidance interval [0, K) exactly (:func:`truncation_interval`
gives K; on the command line ``--interval 0:K``).

**Departures from the pipeline** (docs/families/z_image.md): the pipeline keeps latents and the
guidance arithmetic in float32 whatever the transformer's dtype; negprompt's loop keeps them in the
model's dtype (equal in float32). The pipeline cuts a prompt over its limit silently; negprompt
refuses it. The model's reference code (Tongyi-MAI/Z-Image, ``src/zimage/pipeline.py``) encodes prompts
as the pipeline does but departs in two places, where we follow the pipeline: it guides only for
g > 1 (the pipeline for g > 0), and its N steps run the scheduler's own σ list down to 0, skipping
the model at t = 0 — the pipeline's (and negprompt's) N − 1 steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from negprompt.guidance import syntax
from negprompt.guidance.windows import Window, WindowError
from negprompt.layers.layout import AttentionLayout
from negprompt.models import chat_prompts
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.prompts import PromptError
from negprompt.models.stable_diffusion_3 import decode_shifted, text_length

PATCH = 2  # latent cells per side of one image token: the transformer call's patch_size (its only one)
THINKING = True  # the pipeline's chat template: enable_thinking=True


def chat_template_parts(tokenizer: Any) -> tuple[str, str]:
    """The text the pipeline's chat template puts before and after the prompt (one user message, the
    generation prompt, thinking enabled): for Qwen3 ``"<|im_start|>user\\n"`` and
    ``"<|im_end|>\\n<|im_start|>assistant\\n"``."""
    return chat_prompts.template_parts(tokenizer, THINKING)


def check_length(tokenizer: Any, prompt: str, limit: int) -> None:
    """Raises a one-line :class:`PromptError` when the templated ``prompt`` is over ``limit`` tokens, naming
    the words the pipeline would cut (it truncates at ``max_sequence_length``)."""
    ids, spans, start = chat_prompts.templated_tokens(tokenizer, prompt, THINKING)
    if len(ids) <= limit:
        return
    text = chat_prompts.chat_text(tokenizer, prompt, THINKING)
    cut = text[max(start, spans[limit][0]) : start + len(prompt)].strip()
    what = f"these words would be cut: {cut!r}" if cut else "the chat template's end would be cut"
    raise PromptError(
        f"prompt is {len(ids)} tokens with the chat template, over the model's limit of {limit} "
        f"(max_sequence_length): {what}; shorten the prompt"
    )


def check_weights(prompt: str) -> None:
    """Raises a one-line :class:`PromptError` for AUTOMATIC1111 weights other than 1 in ``prompt``: the
    transformer's caption embedder starts with an RMSNorm of each token's state, and RMSNorm(w·x) = RMSNorm(x)
    (up to its ε), so a weight that scales a token's state would change nothing."""
    weighted = [(text, weight) for text, weight in syntax.resolve(syntax.parse(prompt), 0, 1) if weight != 1]
    if weighted:
        text, weight = weighted[0]
        raise PromptError(
            f"prompt weights such as ({text.strip()}:{weight:g}) cannot act on Z-Image: its transformer "
            "RMS-normalises each prompt token (cap_embedder), which undoes a weight; remove them (weight 1 and "
            "prompt editing [a:b:N] work)"
        )


def encode_qwen(tokenizer: Any, text_encoder: Any, prompt: str, limit: int) -> torch.Tensor:
    """The Qwen3 encoder's second-to-last hidden states at the templated prompt's tokens: (1, L, D), as
    ``ZImagePipeline._encode_prompt`` computes them (padded to ``limit``, with the attention mask, the
    unmasked rows kept). Weights other than 1 are refused (:func:`check_weights`)."""
    check_weights(prompt)
    plain = syntax.plain_text(prompt)
    check_length(tokenizer, plain, limit)
    text = chat_prompts.chat_text(tokenizer, plain, THINKING)
    tokens = tokenizer([text], padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device).bool()
    with torch.no_grad():
        states = text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
    return states[0][mask[0]][None].to(dtype=text_encoder.dtype)


def normalised_times(timesteps: torch.Tensor) -> list[float]:
    """(1000 − t)/1000 per step, as the pipeline computes it for ``cfg_truncation``."""
    return ((1000 - timesteps.float()) / 1000).tolist()


def truncation_interval(components: Parts, steps: int, truncation: float, height: int, width: int) -> Window | None:
    """The guidance interval [0, K) equal to the pipeline's ``cfg_truncation`` c on a run of ``steps``: K
    steps have normalised time ≤ c (time grows step by step, so they lead the schedule); None when every
    step does (c ≥ 1: no truncation). A c that leaves no step guided raises (that run is rule sd at s = 1)."""
    scheduler = type(components.scheduler).from_config(components.scheduler.config)  # the model's own, fresh
    scheduler.set_timesteps(steps, **components.family.timestep_settings(components, steps, height, width))
    times = normalised_times(scheduler.timesteps)
    guided = sum(1 for time in times if time <= truncation)
    if guided == len(times):
        return None
    if guided == 0:
        raise WindowError(f"cfg_truncation {truncation} leaves no step guided; that is scale 1 (no guidance)")
    return Window(0, guided)


class TemplatedKeys:
    """How a prompt's words sit on Z-Image's caption keys: key j is token j of the prompt in the chat template
    (the template's ``<|im_start|>user\\n`` first), as :func:`encode_qwen` feeds it; a word starts at a token
    with the byte-level space ``Ġ`` (or at the prompt's first token). The ``words_at_keys`` of
    ``negprompt.attention.tokens.tokenize_words``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def words_at_keys(self, prompt: str, length: int | None) -> tuple[list[str], list[str], list[list[int]], int, int]:
        """(tokens padded to ``length``, words, each word's key positions, start key, end key (``<|im_end|>``))."""
        tokenizer = self.tokenizer
        ids, spans, start = chat_prompts.templated_tokens(tokenizer, prompt, THINKING)
        length = length or len(ids)
        ids, spans = ids[:length], spans[:length]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        groups, words = chat_prompts.word_groups(
            tokenizer, ids, tokens, chat_prompts.prompt_tokens(spans, start, prompt)
        )
        end = next((i for i, token in enumerate(ids) if token == tokenizer.eos_token_id), len(ids))
        padded = tokens + [str(tokenizer.pad_token)] * (length - len(tokens))
        return padded, words, groups, 0, end


class ZImageFamily(ModelFamily):
    """Z-Image and Z-Image-Turbo (ZImagePipeline directories)."""

    name = "z-image"
    description = "Z-Image (ZImagePipeline: a single-stream DiT, a Qwen3 text encoder)"
    pipeline_classes = ("ZImagePipeline",)
    saved_pipeline_class = "ZImagePipeline"
    has_vae = True
    denoiser_classes = ("ZImageTransformer2DModel",)
    # ZImagePipeline's defaults: 50 steps, guidance_scale g = 5 (rule sd's s = g + 1), 1024 px (default_size).
    default_sampling = {"scale": 6.0, "steps": 50}
    required_parts = ("transformer", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("transformer", "text_encoder")
    default_text_length: ClassVar[int] = 512  # the pipeline's max_sequence_length

    # ---------------------------------------------------------------- prompts

    def text_length(self, components: Parts) -> int:
        """Templated tokens a prompt may have: the model's declared ``max_sequence_length``, else 512."""
        return text_length(components, components.tokenizer, self.default_text_length)

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.text_2 is not None or item.size_conditions is not None:
            raise ConditioningError(f"{self.description} has one text encoder and no size conditions; got {item!r}")
        length = self.text_length(components)
        return Conditioning(encode_qwen(components.tokenizer, components.text_encoder, item.text, length))

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """The caption keys: the templated prompt's Qwen tokens (key j = token j, the template's included), up to
        ``max_sequence_length``."""
        return [(TemplatedKeys(components.tokenizer), 0, self.text_length(components))]

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Single-stream attention over [image; caption] tokens, read by :class:`ZImageReader` (the main layers'
        image-query × caption-key block; NAG and VSF with the negative's caption as a stream of its own); the chat
        template's opening tokens lead the caption's keys (VSF leaves them out of the negative's)."""
        from negprompt.layers.z_image_attention import ZImageReader

        before, _ = chat_template_parts(components.tokenizer)
        start = len(components.tokenizer(before, add_special_tokens=False, verbose=False).input_ids)
        return AttentionLayout(
            "joint", text_start_tokens=start, patch=PATCH, family=self.description, reader=ZImageReader()
        )

    # ---------------------------------------------------------------- geometry

    def size_multiple(self, components: Parts) -> int:
        """VAE factor × 2: the transformer reads 2×2 patches of latent cells."""
        return self.latent_factor(components) * PATCH

    def default_size(self, components: Parts) -> int:
        """128 latent cells × the VAE factor: the pipeline's 1024 px with Z-Image's VAE (8 px a cell)."""
        return 128 * self.latent_factor(components)

    # ---------------------------------------------------------------- denoising

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """The pipeline's σ list (1 … 1/N) and μ of the image-size shift for its image tokens."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        config = components.scheduler.config
        factor = self.size_multiple(components)
        mu = calculate_shift(
            (height // factor) * (width // factor),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": get_default_z_image_sigmas(num_steps), "mu": mu}

    def takes_embedded_guidance(self, components: Parts) -> bool:
        return False

    def denoise(
        self,
        components: Parts,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        rows: list[Conditioning],
        guidance_inputs: Mapping[str, torch.Tensor],
        expert: int | None = None,
    ) -> torch.Tensor:
        """The velocity (B, C, h, w) for latents (B, C, h, w): lists of (C, 1, h, w) latents and (L_i, D)
        caption states, time 1 − σ; the model's x₀ − ε negated."""
        transformer = components.transformer
        time = (1000 - timestep.expand(latents.shape[0])) / 1000
        images = list(latents.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
        captions = [row.hidden_states[0] for row in rows]
        outputs = transformer(images, time, captions, return_dict=False)[0]
        return -torch.stack(outputs).squeeze(2).to(latents.dtype)

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        return decode_shifted(components, latents)
