"""Qwen-Image (Qwen team, Alibaba 2025; arXiv 2508.02324): a double-stream MMDiT on video-VAE latents, flow matching.

**Prompts.** As diffusers' ``QwenImagePipeline`` encodes one prompt: the text goes into a chat template
(a system message asking to describe the image, the prompt as the user's message, the assistant's
turn opened: :data:`PROMPT_TEMPLATE`); Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, its
language model only) reads the templated tokens with their attention mask, and the last entry of its
``hidden_states`` at those tokens, less the template's first :data:`TEMPLATE_TOKENS` (34: the system
message and ``<|im_start|>user\\n``, the pipeline's ``drop_idx``), is the prompt's embedding: (1, L, D),
L the prompt's tokens plus the template's 5 closing ones — a different length for every prompt (D =
3584 for Qwen-Image). A :class:`~negprompt.models.conditioning.Conditioning` holds it unpadded.
AUTOMATIC1111 prompt editing (``[a:b:when]``) works as everywhere; weights (``(word:1.3)``) are refused:
negprompt weighs a word by scaling its tokens' states, and the transformer's first step on the text
(``txt_norm``, an RMSNorm per token) undoes any such scale, so a weight would silently change nothing.

**Denoiser.** ``QwenImageTransformer2DModel`` reads latents packed 2×2 into tokens, (B, h/2·w/2, 4C),
as FLUX's (:func:`negprompt.models.flux.pack`), with ``img_shapes`` [(1, h/2, w/2)] for its rotary
positions (MSRoPE: image tokens at centred (frame, row, column) positions, text tokens on the
diagonal after them), ``timestep`` σ = t/1000 and the prompts' states with
``encoder_hidden_states_mask``. The rows of one call (negative, positive …) have prompts of different
lengths: :func:`batch_prompts` pads them with zeros to the longest and masks the padding, as the
pipeline does for a batch of prompts (no mask when all have one length). It predicts the velocity
v = ε − x₀ (B, C, h, w) once unpacked.

**Schedule.** σ = 1 … 1/N evenly, shifted by the image-size μ of the pipeline's ``calculate_shift``
(Qwen-Image's scheduler shifts exponentially, between (256 tokens, 0.5) and (8192, 0.9), and stretches σ
to end at 0.02).

**Guidance.** The pipeline's "true CFG" (``negative_prompt`` with ``true_cfg_scale`` s > 1: a second pass)
is v̂ = comb · ‖v_y‖/‖comb‖, comb = v_ỹ + s(v_y − v_ỹ), the norms per image token (2×2 latent cells ×
C channels): negprompt's rule ``token-renorm`` (:mod:`negprompt.guidance.rules.token_renorm`, which reads
the token's patch from :meth:`QwenImageFamily.attention_layout`). Rule ``sd``, negprompt's default, is the
same without the renormalisation. The denoiser takes no guidance scale as an input.

**Latents and decoding.** The VAE is a video VAE: its latents carry a frame axis (B, C, 1, h, w) and are
normalised per channel, z = (x − mean)/std; the loop keeps (B, C, h, w) and :meth:`QwenImageFamily.to_pixels`
adds the frame axis and undoes the normalisation before decoding, as the pipeline does.

**Departures.** The pipeline cuts a prompt's embedding at ``max_sequence_length`` (512; 1024 at most)
silently, the template's closing tokens first; negprompt refuses a prompt that long, naming the words
that would be cut. The pipeline encodes a batch of prompts padded together; negprompt encodes each
alone (a prompt's conditioning never depends on its batch; with the encoder's causal attention and
right padding the states agree up to float rounding). Without a negative the pipeline runs no CFG
at all; negprompt's rules guide against the empty prompt (the template around ""), as the pipeline
does for ``negative_prompt=""`` (Qwen-Image's examples pass ``" "``). The model's reference release
uses this pipeline; we follow it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from negprompt.guidance import syntax
from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.flux import pack, unpack
from negprompt.models.prompts import PromptError
from negprompt.models.stable_diffusion_3 import image_size_shift

# QwenImagePipeline's prompt template and the tokens of it dropped before the prompt (``drop_idx``).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
PATCH = 2  # latent cells per side of one image token: the pipeline packs 2×2


def templated_tokens(tokenizer: Any, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``prompt`` (no syntax) in the template, and each token's character span in the templated
    text; the prompt starts at ``PROMPT_TEMPLATE.index("{}")``."""
    tokens = tokenizer(PROMPT_TEMPLATE.format(prompt), return_offsets_mapping=True, verbose=False)
    return list(tokens.input_ids), [tuple(span) for span in tokens.offset_mapping]


def check_length(tokenizer: Any, prompt: str, limit: int) -> list[int]:
    """The templated token ids of ``prompt``, or a one-line :class:`PromptError` when its embedding (the tokens
    after the template's first 34) is over ``limit``, naming the words the pipeline would cut."""
    ids, spans = templated_tokens(tokenizer, prompt)
    length = len(ids) - TEMPLATE_TOKENS
    if length <= limit:
        return ids
    start = PROMPT_TEMPLATE.index("{}")
    first_cut, end = spans[TEMPLATE_TOKENS + limit][0], start + len(prompt)
    cut = PROMPT_TEMPLATE.format(prompt)[max(first_cut, start) : end].strip() if first_cut < end else ""
    what = f"these words would be cut: {cut!r}" if cut else "the template's closing tokens would be cut"
    raise PromptError(
        f"prompt is {length} Qwen2.5-VL tokens with the template's end, over the model's limit of {limit} "
        f"(max_sequence_length): {what}; shorten the prompt"
    )


def check_weights(prompt: str) -> None:
    """Raises a one-line :class:`PromptError` when ``prompt`` weighs words ((text:w), w ≠ 1): AUTOMATIC1111 weights
    scale a token's text-encoder states, and the transformer normalises each token's states (``txt_norm``, an
    RMSNorm) before it reads them, which undoes any such scale."""
    weights = sorted({weight for _, weight in syntax.resolve(syntax.parse(prompt), 0, 1) if weight != 1.0})
    if weights:
        raise PromptError(
            f"prompt {prompt!r} weighs words ({', '.join(f'{w:g}' for w in weights)}), but Qwen-Image normalises "
            "each text token's states (RMSNorm) before reading them, so a weight changes nothing; remove the "
            "weights (prompt editing [a:b:when] works)"
        )


def encode_qwen(tokenizer: Any, text_encoder: Any, prompt: str, limit: int) -> torch.Tensor:
    """The prompt's embedding (1, L, D): Qwen2.5-VL's last ``hidden_states`` entry at the templated tokens after
    the first 34, as ``QwenImagePipeline._get_qwen_prompt_embeds`` computes it for one prompt. Refuses a prompt
    over ``limit`` (:func:`check_length`) or with weights (:func:`check_weights`)."""
    if syntax.has_syntax(prompt):
        check_weights(prompt)
    ids = check_length(tokenizer, syntax.plain_text(prompt), limit)
    device = text_encoder.device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        states = text_encoder(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=True
        ).hidden_states[-1]
    return states[:, TEMPLATE_TOKENS:].to(dtype=text_encoder.dtype)


def batch_prompts(rows: Sequence[Conditioning]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows' prompt states (1, L_i, D) as one batch (B, max L_i, D), zero-padded, and the mask (B, max L_i)
    (1 on a prompt's tokens, 0 on padding; int64), or None when every prompt has the same length: as
    ``QwenImagePipeline.encode_prompt`` batches prompts."""
    states = [row.hidden_states for row in rows]
    longest = max(state.shape[1] for state in states)
    if all(state.shape[1] == longest for state in states):
        return torch.cat(states), None
    padded = torch.cat([torch.nn.functional.pad(state, (0, 0, 0, longest - state.shape[1])) for state in states])
    mask = torch.zeros(len(states), longest, dtype=torch.long, device=padded.device)
    for i, state in enumerate(states):
        mask[i, : state.shape[1]] = 1
    return padded, mask


def vae_latents(latents: torch.Tensor, config: Any) -> torch.Tensor:
    """The VAE's latents (B, C, 1, h, w) from normalised ones z: z / (1/std) + mean per channel, as the pipeline writes it."""
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


class QwenImageFamily(ModelFamily):
    """Qwen-Image and its fine-tunes (QwenImagePipeline directories)."""

    name = "qwen-image"
    description = "Qwen-Image (QwenImagePipeline: a double-stream MMDiT, a Qwen2.5-VL text encoder)"
    pipeline_classes = ("QwenImagePipeline",)
    saved_pipeline_class = "QwenImagePipeline"
    has_vae = True
    denoiser_classes = ("QwenImageTransformer2DModel",)
    # QwenImagePipeline's defaults: 50 steps, true_cfg_scale 4 (with a negative), 1024 px (default_size).
    default_sampling = {"scale": 4.0, "steps": 50}
    required_parts = ("transformer", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("transformer", "text_encoder")
    default_text_length: ClassVar[int] = 512  # the pipeline's max_sequence_length

    # ---------------------------------------------------------------- prompts

    def text_length(self, components: Parts) -> int:
        """Embedding tokens a prompt may have: the model's declared ``max_sequence_length``, else 512."""
        declared = components.declarations.max_sequence_length
        return self.default_text_length if declared is None else declared

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.text_2 is not None or item.size_conditions is not None:
            raise ConditioningError(f"{self.description} has one text encoder and no size conditions; got {item!r}")
        length = self.text_length(components)
        return Conditioning(encode_qwen(components.tokenizer, components.text_encoder, item.text, length))

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """The text keys are the embedding's tokens: the prompt's own tokens first (the template's 34 before them are
        dropped; a prompt is tokenized in the template as alone), then the template's 5 closing ones; L = the
        longest embedding (``text_length``), zeros past a row's own length."""
        return [(components.tokenizer, 0, self.text_length(components))]

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Joint attention over [text; image] keys, read by
        :class:`~negprompt.layers.qwen_image_attention.QwenImageReader`
        (complex rotary positions, a key mask; NAG and VSF with the negative's text as a stream of its own); the
        template's first tokens are dropped, so no start token leads the text; each image token a 2×2 patch."""
        from negprompt.layers.qwen_image_attention import QwenImageReader

        return AttentionLayout(
            "joint", text_start_tokens=0, patch=PATCH, family=self.description, reader=QwenImageReader()
        )

    # ---------------------------------------------------------------- geometry

    def latent_factor(self, components: Parts) -> int:
        """Pixels per latent cell: 2^(VAE downsampling levels), the pipeline's ``vae_scale_factor`` (8)."""
        return 2 ** len(components.vae.config.temperal_downsample)

    def latent_channels(self, components: Parts) -> int:
        """Channels before packing: the transformer's input is 4 per 2×2 patch."""
        return int(components.transformer.config.in_channels) // 4

    def size_multiple(self, components: Parts) -> int:
        """VAE factor × 2: packing needs even latent sides."""
        return self.latent_factor(components) * PATCH

    def default_size(self, components: Parts) -> int:
        """128 latent cells (the pipeline's default sample size) × the VAE factor: 1024 px."""
        return 128 * self.latent_factor(components)

    def image_tokens(self, components: Parts, height: int, width: int) -> int:
        side = self.size_multiple(components)
        return (height // side) * (width // side)

    # ---------------------------------------------------------------- denoising

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """σ = 1 … 1/N evenly and μ of the image-size shift, as the pipeline passes them."""
        mu = image_size_shift(self.image_tokens(components, height, width), components.scheduler.config, 1.15)
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}

    def takes_embedded_guidance(self, components: Parts) -> bool:
        """No: Qwen-Image has no guidance input (diffusers' ``guidance_embeds`` path has no embedder)."""
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
        """The velocity (B, C, h, w) for latents (B, C, h, w): packed, with the image's token grid, t/1000 and
        the rows' prompts padded and masked (:func:`batch_prompts`)."""
        batch, _, height, width = latents.shape
        hidden, mask = batch_prompts(rows)
        tokens = components.transformer(
            hidden_states=pack(latents),
            timestep=timestep.expand(batch).to(latents.dtype) / 1000,
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height // PATCH, width // PATCH)]] * batch,
            return_dict=False,
        )[0]
        return unpack(tokens, height, width)

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W): the frame axis added, the normalisation undone, decoded."""
        vae = components.vae
        frames = vae_latents(latents[:, :, None].to(vae.dtype), vae.config)
        return vae.decode(frames, return_dict=False)[0][:, :, 0]
