"""FLUX.2 [klein] (Black Forest Labs): a FLUX.2 transformer on patchified VAE latents, Qwen3 text, flow matching.

The model: ``Flux2Transformer2DModel`` (double-stream blocks, then single-stream "parallel" blocks;
rotary positions on four axes (t, h, w, l)), a Qwen3 causal language model as text encoder and the
FLUX.2 VAE (``AutoencoderKLFlux2``). Klein comes as base models (``is_distilled`` false in
``model_index.json``: CFG at scale 4, 50 steps) and step-distilled ones (``is_distilled`` true: one
pass a step on the prompt alone).

Prompt, as diffusers' ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` encodes it: the text as a user
message in Qwen's chat template (no thinking: ``<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n
<think>\\n\\n</think>\\n\\n``), padded (attention mask) to ``max_sequence_length`` L = 512 tokens; the hidden
states of layers 9, 18 and 27 stacked on the feature axis → (1, L, 3·D) (D = 2560 for Qwen3-4B). No
pooled embedding. AUTOMATIC1111 weights scale each token's states, as :mod:`negprompt.models.prompts`
does for CLIP and T5, the tokens being those of the templated prompt (no chunked tokenization).

Geometry: VAE latents (C, H/8, W/8) are patchified 2×2 into (4C, H/16, W/16) and normalised with the
VAE's batch-norm running statistics; diffusers draws the initial noise in that form, so the loop keeps
its latents there (one latent cell = one transformer token of 16 × 16 pixels). Each call packs them
to tokens (B, H/16·W/16, 4C) with position ids (0, row, column, 0), the text with (0, 0, 0, index).

Denoiser: ``transformer(hidden_states, timestep=t/1000, guidance=None, encoder_hidden_states, txt_ids,
img_ids)`` → the velocity v = ε − x₀ per token. Timesteps: σ = 1 … 1/N evenly, shifted by
μ = ``compute_empirical_mu(image tokens, N)`` (BFL's empirical fit, diffusers' function).

Guidance: a base Klein runs CFG v̂ = v_ỹ + s(v_y − v_ỹ) (negprompt's rule ``sd``; cfg without a negative,
ỹ = ""). Where diffusers departs from BFL's reference implementation (its sampler and Qwen3 embedder), and
which we follow:

- negative text: the reference has none (ỹ = ""); the pipeline takes only ``negative_prompt_embeds``;
  negprompt takes negative text and encodes it as the positive (the same template and layers);
- CFG calls: the reference batches [∅; prompt] in one call, the pipeline calls twice; negprompt batches
  a group's rows in one call (equal to the pipeline up to float rounding);
- schedule: the reference shifts ``linspace(1, 0, N + 1)`` in torch, the pipeline σ = 1 … 1/N in numpy
  through the scheduler (the same σ up to rounding); we follow the pipeline;
- a step-distilled Klein with scale > 1: the pipeline ignores the scale with a warning, the reference
  sampler never runs CFG on it; negprompt refuses any guidance that evaluates more than one branch a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from negprompt.errors import NegpromptError
from negprompt.guidance import syntax
from negprompt.layers.layout import AttentionLayout
from negprompt.models import chat_prompts
from negprompt.models.conditioning import Conditioning, ConditioningError, PromptInput
from negprompt.models.family import ModelFamily, Parts
from negprompt.models.prompts import PromptError, apply_weights
from negprompt.models.stable_diffusion_3 import text_length

THINKING = False  # the pipeline's chat template: enable_thinking=False
TEXT_LAYERS = (9, 18, 27)  # Qwen3 hidden states the pipeline stacks (``text_encoder_out_layers``)
DEFAULT_TEXT_LENGTH = 512  # the pipeline's ``max_sequence_length``
PATCH = 2  # VAE latent cells per side of one transformer token


class DistilledGuidanceError(NegpromptError):
    """Guidance that evaluates more than one branch a step, on a step-distilled model."""


# ---------------------------------------------------------------- prompts


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the pipeline hands it to the tokenizer: a user message in the chat template, with the
    assistant's turn opened and thinking switched off (:func:`negprompt.models.chat_prompts.chat_text`)."""
    return chat_prompts.chat_text(tokenizer, prompt, THINKING)


def templated_tokens(tokenizer: Any, prompt: str) -> tuple[list[int], list[tuple[int, int]], int]:
    """The templated prompt's token ids, their character spans and where the prompt starts, untruncated."""
    return chat_prompts.templated_tokens(tokenizer, prompt, THINKING)


def check_klein_prompt(tokenizer: Any, prompt: str, length: int) -> None:
    """Raises a one-line :class:`PromptError` when the templated ``prompt`` (plain text) is over ``length``
    tokens (the pipeline would cut it, the template's end with it), naming the words to cut."""
    ids, spans, start = templated_tokens(tokenizer, prompt)
    if len(ids) <= length:
        return
    own = chat_prompts.prompt_tokens(spans, start, prompt)
    keep = max(0, len(own) - (len(ids) - length))
    cut = tokenizer.decode([ids[i] for i in own[keep:]]).strip()
    raise PromptError(
        f"prompt is {len(own)} tokens, {len(ids)} in Qwen's chat template, over the model's limit of {length} "
        f"(max_sequence_length): these words would be cut: {cut!r}; shorten the prompt"
    )


class TemplateKeys:
    """The text keys of FLUX.2 [klein]: Qwen's tokens of the prompt inside the chat template (the template's
    tokens first), padded to the model's text length; a text-key segment for capture
    (``negprompt.attention.tokens.tokenize_words`` asks :meth:`words_at_keys`)."""

    def __init__(self, tokenizer: Any, length: int) -> None:
        self.tokenizer, self.length = tokenizer, length
        self.model_max_length = length

    def words_at_keys(
        self, prompt: str, length: int | None = None
    ) -> tuple[list[str], list[str], list[list[int]], int, int]:
        """(tokens, words, each word's key positions, start, end): a word starts at a token that begins with
        ``Ġ`` (the space before it) or at the prompt's first token; ``<start>`` is the template's first token
        (``<|im_start|>``), ``<end>`` the ``<|im_end|>`` after the prompt."""
        length = length or self.length
        ids, spans, start = templated_tokens(self.tokenizer, prompt)
        own = chat_prompts.prompt_tokens(spans, start, prompt)
        tokens = self.tokenizer.convert_ids_to_tokens(ids[:length])
        tokens += [self.tokenizer.pad_token or ""] * (length - len(tokens))
        groups, words = chat_prompts.word_groups(self.tokenizer, ids, tokens, [i for i in own if i < length])
        end = min(own[-1] + 1 if own else sum(1 for first, last in spans if last <= start and last > first), length - 1)
        return tokens, words, groups, 0, end


def token_weights(tokenizer: Any, chunks: list[tuple[str, float]], length: int) -> list[float]:
    """A weight per token of the templated, padded prompt (``length`` tokens): a prompt token takes the weight
    of the chunk holding its last character (byte-level BPE tokens carry the space before a word), template
    and padding tokens 1."""
    prompt = "".join(text for text, _ in chunks)
    start = chat_prompts.prompt_start(tokenizer, prompt, THINKING)
    encoded = tokenizer(
        chat_text(tokenizer, prompt),
        padding="max_length",
        truncation=True,
        max_length=length,
        return_offsets_mapping=True,
        verbose=False,
    )
    ends, total = [], start  # the end of each chunk in the templated text
    for text, _ in chunks:
        total += len(text)
        ends.append(total)
    weights = []
    for first, last in encoded.offset_mapping:
        inside = last > first and start <= last - 1 < total
        weights.append(next(w for end, (_, w) in zip(ends, chunks) if last - 1 < end) if inside else 1.0)
    return weights


def encode_klein(
    tokenizer: Any, text_encoder: Any, prompt: str, length: int, layers: tuple[int, ...] = TEXT_LAYERS
) -> torch.Tensor:
    """One prompt's token states (1, ``length``, len(layers)·D): diffusers' own encoder of the pipeline on the
    plain text, then each token's states scaled by its AUTOMATIC1111 weight (:func:`token_weights`) and the
    whole rescaled to the unweighted mean (:mod:`negprompt.models.prompts`). Refuses a prompt over ``length``."""
    from diffusers import Flux2KleinPipeline

    chunks = syntax.resolve(syntax.parse(prompt), 0, 1) if syntax.has_syntax(prompt) else [(prompt, 1.0)]
    plain = "".join(text for text, _ in chunks)
    check_klein_prompt(tokenizer, plain, length)
    with torch.no_grad():
        hidden = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder, tokenizer, [plain], max_sequence_length=length, hidden_states_layers=layers
        )
    if syntax.has_syntax(prompt):
        hidden = apply_weights(hidden, token_weights(tokenizer, chunks, length))
    return hidden.to(dtype=text_encoder.dtype)


# ---------------------------------------------------------------- latents


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h·w, C): each latent cell one token, row by row (``Flux2KleinPipeline._pack_latents``)."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._pack_latents(latents)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h·w, C) → (B, C, h, w), the inverse of :func:`pack`."""
    return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], height, width)


class Flux2KleinFamily(ModelFamily):
    """FLUX.2 [klein] base and step-distilled models (Flux2KleinPipeline directories)."""

    name = "flux2-klein"
    description = "FLUX.2 [klein] (Flux2KleinPipeline: a FLUX.2 transformer, Qwen3)"
    pipeline_classes = ("Flux2KleinPipeline",)
    saved_pipeline_class = "Flux2KleinPipeline"
    has_vae = True
    denoiser_classes = ("Flux2Transformer2DModel",)
    text_encoder_classes: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM",)  # FLUX.2 [dev] reads Mistral
    default_sampling = {"scale": 4.0, "steps": 50}  # Flux2KleinPipeline's defaults
    required_parts = ("transformer", "text_encoder", "tokenizer", "scheduler")
    weight_parts = ("transformer", "text_encoder")

    def matches_parts(self, parts: Parts) -> bool:
        """A FLUX.2 transformer with a Qwen3 text encoder (FLUX.2 [dev] has the same transformer class)."""
        return super().matches_parts(parts) and type(parts.text_encoder).__name__ in self.text_encoder_classes

    def is_distilled(self, components: Parts) -> bool:
        """Step-distilled (``model_index.json``'s ``is_distilled``): one pass a step, no CFG."""
        return bool(components.pipeline_options.get("is_distilled", False))

    def sampling_defaults(self, components: Parts) -> dict[str, Any]:
        """The pipeline's 50 steps; scale 4, or 1 for a step-distilled model (whose scale the pipeline ignores)."""
        return {**self.default_sampling, "scale": 1.0} if self.is_distilled(components) else dict(self.default_sampling)

    def check_guidance(self, components: Parts, guidance: Any, calls: int) -> None:
        """A step-distilled model takes one branch a step (rule ``sd`` or ``cfg`` at scale 1: the prompt alone)."""
        if not self.is_distilled(components):
            return
        step = next((i for i in range(calls) if len(guidance.branches_at(i, calls)) > 1), None)
        if step is not None:
            branches = ", ".join(guidance.branches_at(step, calls))
            raise DistilledGuidanceError(
                f"this FLUX.2 [klein] is step-distilled (is_distilled in model_index.json) and runs one pass a step "
                f"on the prompt alone, but rule {guidance.rule!r} at scale {guidance.scale:g} evaluates {branches} "
                f"at step {step}; use scale 1, with rule nag or vsf for a negative"
            )

    # ---------------------------------------------------------------- prompts

    def text_length(self, components: Parts) -> int:
        """``max_sequence_length``: the model's ``negprompt.json`` value, else 512, at most the tokenizer's limit."""
        return text_length(components, components.tokenizer, DEFAULT_TEXT_LENGTH)

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        if item.text_2 is not None or item.size_conditions is not None:
            raise ConditioningError(f"{self.description} has one text encoder and no size conditions; got {item!r}")
        length = self.text_length(components)
        return Conditioning(encode_klein(components.tokenizer, components.text_encoder, item.text, length))

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """Qwen's tokens of the templated prompt (the template's tokens first), padded to ``max_sequence_length``."""
        length = self.text_length(components)
        return [(TemplateKeys(components.tokenizer, length), 0, length)]

    def template_start_tokens(self, components: Parts) -> int:
        """Tokens of the chat template before the prompt's own (``<|im_start|>``, ``user``, a newline)."""
        _, spans, start = templated_tokens(components.tokenizer, "")
        return sum(1 for first, last in spans if last <= start and last > first)

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """Joint attention over [text; image] keys in every block, read by
        :class:`~negprompt.layers.flux2_klein_attention.Flux2KleinReader` (double-stream and parallel single-stream
        layers; NAG and VSF run the negative's text as a stream of its own). Text keys lead [text; image], the
        template's tokens first; one image token per latent cell of the loop."""
        from negprompt.layers.flux2_klein_attention import Flux2KleinReader

        return AttentionLayout(
            "joint",
            family=self.description,
            text_start_tokens=self.template_start_tokens(components),
            patch=1,
            reader=Flux2KleinReader(),
        )

    # ---------------------------------------------------------------- geometry

    def vae_factor(self, components: Parts) -> int:
        """Pixels per VAE latent cell: 2^(VAE down blocks − 1) (8 for FLUX.2's VAE)."""
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

    def latent_factor(self, components: Parts) -> int:
        """Pixels per latent cell of the loop, which keeps the latents patchified 2×2: 16 for FLUX.2."""
        return self.vae_factor(components) * PATCH

    def latent_channels(self, components: Parts) -> int:
        """4 × the VAE's latent channels (128 for FLUX.2): the transformer's input per token."""
        return int(components.transformer.config.in_channels)

    def size_multiple(self, components: Parts) -> int:
        return self.latent_factor(components)

    def default_size(self, components: Parts) -> int:
        """128 VAE latent cells (the pipeline's default sample size) × the VAE factor: 1024."""
        return 128 * self.vae_factor(components)

    # ---------------------------------------------------------------- denoising

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """σ = 1 … 1/N evenly (unless the scheduler makes its own ``use_flow_sigmas``) and μ of BFL's empirical
        shift for the image's tokens and N, as the pipeline passes them."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        side = self.latent_factor(components)
        settings: dict[str, Any] = {"mu": compute_empirical_mu((height // side) * (width // side), num_steps)}
        if not components.scheduler.config.get("use_flow_sigmas"):
            settings["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        return settings

    def takes_embedded_guidance(self, components: Parts) -> bool:
        """The pipeline gives Klein's transformer no guidance input."""
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
        """The velocity (B, C, h, w) for latents (B, C, h, w): packed, with position ids and t/1000."""
        from diffusers import Flux2KleinPipeline

        batch, _, height, width = latents.shape
        hidden = torch.cat([row.hidden_states for row in rows])
        tokens = components.transformer(
            hidden_states=pack(latents),
            timestep=timestep.expand(batch).to(latents.dtype) / 1000,
            guidance=None,
            encoder_hidden_states=hidden,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(hidden).to(latents.device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(latents).to(latents.device),
            return_dict=False,
        )[0]
        return unpack(tokens, height, width)

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        """x = D(unpatchify(z·σ_bn + μ_bn)): the VAE's batch-norm statistics undone, 2×2 patches unfolded."""
        from diffusers import Flux2KleinPipeline

        vae = components.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device)
        latents = Flux2KleinPipeline._unpatchify_latents(latents * std.to(latents.dtype) + mean)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
