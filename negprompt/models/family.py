"""Model families as adapters: what differs between Stable Diffusion, the bundled pixel model, SDXL …

A family knows which parts a model directory holds, how to encode one row's
:class:`~negprompt.models.conditioning.PromptInput` into a
:class:`~negprompt.models.conditioning.Conditioning`, the latent geometry and how latents become
images. It also calls the denoiser (:meth:`ModelFamily.denoise`: a UNet here, an MMDiT transformer
with packed latents for FLUX) and sets the scheduler's timesteps the way the family's pipeline does.
The sampling loop sees only the family, the scheduler and conditionings; a new family is one
new module listed in :mod:`negprompt.models.families` (SDXL's, with two text encoders, pooled
embeddings and time ids, is :mod:`negprompt.models.stable_diffusion_xl`; SD3's and FLUX's, flow
matching on transformers, :mod:`negprompt.models.stable_diffusion_3` and :mod:`negprompt.models.flux`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from negprompt.errors import NegpromptError
from negprompt.layers.layout import AttentionLayout
from negprompt.models.conditioning import (
    Conditioning,
    ConditioningError,
    PromptInput,
    as_input,
    denoiser_inputs,
    guidance_embedding,
)
from negprompt.models.declarations import Declarations
from negprompt.models.prompts import encode_prompts


class EmbeddedGuidanceError(NegpromptError):
    """Embedded guidance given to a model that takes none, or missing for one that needs it."""


class VideoSettingsError(NegpromptError):
    """A frame count the model cannot make, or a second expert's scale for a model with one denoiser."""


class Parts(Protocol):
    """What a family reads of a loaded model (``negprompt.models.components.Components`` is one)."""

    unet: Any
    transformer: Any | None  # SD3, FLUX (unet is None)
    transformer_2: Any | None  # Wan 2.2's low-noise expert
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    vae: Any | None
    text_encoder_2: Any | None  # SDXL
    tokenizer_2: Any | None
    text_encoder_3: Any | None  # SD3's T5
    tokenizer_3: Any | None
    pipeline_options: dict[str, Any]  # model_index.json's settings, e.g. force_zeros_for_empty_prompt
    declarations: Declarations  # the model's negprompt.json

    @property
    def device(self) -> torch.device: ...

    @property
    def denoiser(self) -> Any: ...

    @property
    def dtype(self) -> torch.dtype: ...


# The model parts a family may read, besides the scheduler and the VAE.
PART_SLOTS = (
    "unet",
    "transformer",
    "transformer_2",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)

PartLoader = Callable[..., Any]  # (part name, base class, **from_pretrained kwargs) → the loaded part


def check_second_scale(components: Parts, expert_at: Callable[..., int], scale: float, scale_2: float | None) -> None:
    """A second expert's scale only for a model whose ``expert_at`` gives the low-noise timesteps to a second expert;
    not 1 on one expert only (scale 1 evaluates the positive alone, other scales the negative too: the branches of a
    step must not depend on its expert)."""
    if scale_2 is None:
        return
    if not expert_at(components, 0.0):
        raise VideoSettingsError(
            f"a second scale {scale_2:g} given, but {components.source} has one denoiser; it is the scale of a "
            "second expert's steps (Wan 2.2's transformer_2): give --scale only"
        )
    if (scale == 1) != (scale_2 == 1):
        raise VideoSettingsError(
            f"scales {scale:g} and {scale_2:g} for the two experts: scale 1 (the positive alone, one pass) on one "
            "expert only is not supported; give both 1 or both other than 1"
        )


class ModelFamily:
    """Base of the adapters. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = "model"
    description: ClassVar[str] = "a model"
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # model_index.json ``_class_name`` values it reads
    has_vae: ClassVar[bool] = False
    size_conditioned: ClassVar[bool] = False  # conditioned on image-size micro-conditions (SDXL)
    second_prompt: ClassVar[bool] = False  # a second text encoder with a prompt of its own (SDXL)
    default_sampling: ClassVar[dict[str, Any]] = {}  # the family's pipeline defaults (e.g. SDXL's scale 5)
    saved_pipeline_class: ClassVar[str | None] = None  # ``_class_name`` it is saved under (None: negprompt's)
    makes_video: ClassVar[bool] = False  # latents with a frame axis, decoded to frames (B, F, H, W, 3) (Wan)
    # A video VAE whose frame f sees only frames ≤ f: decoding latent frames 0…f gives the whole video's first frames
    # bit for bit (Wan's causal 3-D VAE), so a figure of one frame decodes that prefix only.
    decodes_causally: ClassVar[bool] = False

    def matches(self, index: Mapping[str, Any]) -> bool:
        """Whether a model directory with this ``model_index.json`` belongs to the family."""
        has_vae = (index.get("vae") or [None])[0] is not None
        return index.get("_class_name", "NegpromptPipeline") in self.pipeline_classes and has_vae == self.has_vae

    denoiser_classes: ClassVar[tuple[str, ...]] = ("UNet2DConditionModel",)  # the denoisers it calls

    def matches_parts(self, parts: Parts) -> bool:
        """Whether parts built in memory are the family's: a denoiser of a class it calls, its required
        parts, no model part it does not read (e.g. a second text encoder), a VAE if and only if it has one."""
        if type(parts.denoiser).__name__ not in self.denoiser_classes or (parts.vae is not None) != self.has_vae:
            return False
        present = {slot for slot in PART_SLOTS if getattr(parts, slot, None) is not None}
        required = set(self.required_parts) & set(PART_SLOTS)
        return required <= present <= required | set(self.optional_parts)

    # ---------------------------------------------------------------- loading

    required_parts: ClassVar[tuple[str, ...]] = ("unet", "text_encoder", "tokenizer", "scheduler")  # besides a VAE
    weight_parts: ClassVar[tuple[str, ...]] = ("unet", "text_encoder")  # besides a VAE; safetensors only
    optional_parts: ClassVar[tuple[str, ...]] = ()  # read when model_index.json lists them (SD3's T5)

    def load(
        self,
        load_part: PartLoader,
        weights: dict[str, Any],
        diffusers_weights: dict[str, Any],
        listed: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """The parts by name (keywords of ``Components``): the required ones, the optional ones
        ``model_index.json`` lists (``listed``) and the VAE, each loaded with ``load_part(part, base class,
        **kwargs)`` (safetensors only)."""
        import diffusers
        import transformers

        parts: dict[str, Any] = {"unet": None}
        for name in self.required_parts + tuple(p for p in self.optional_parts if p in listed):
            if name in ("unet", "transformer", "transformer_2"):
                parts[name] = load_part(name, diffusers.ModelMixin, **diffusers_weights)
            elif name.startswith("text_encoder"):
                parts[name] = load_part(name, transformers.PreTrainedModel, **weights)
            elif name.startswith("tokenizer"):
                parts[name] = load_part(name, transformers.PreTrainedTokenizerBase, local_files_only=True)
            else:
                parts[name] = load_part(name, diffusers.SchedulerMixin)
        parts["vae"] = load_part("vae", diffusers.ModelMixin, **diffusers_weights) if self.has_vae else None
        return parts

    # ---------------------------------------------------------------- prompts

    def zeros_empty_negatives(self, components: Parts) -> bool:
        """Whether an empty negative is encoded as zeros (SDXL's ``force_zeros_for_empty_prompt``)."""
        return False

    def encode(self, components: Parts, inputs: Iterable[PromptInput | str]) -> dict[PromptInput | str, Conditioning]:
        """Each distinct input (a :class:`PromptInput` or a bare text) encoded once, alone (its conditioning
        never depends on a batch), on the UNet's device; keyed as given."""
        return {item: self.encode_one(components, as_input(item)).to(components.device) for item in set(inputs)}

    def encode_one(self, components: Parts, item: PromptInput) -> Conditioning:
        """One input's conditioning: the text encoder's last hidden states (SD 1.x/2.x, the bundled model)."""
        if item.text_2 is not None or item.size_conditions is not None:
            raise ConditioningError(f"{self.description} has one text encoder and no size conditions; got {item!r}")
        return Conditioning(encode_prompts(components.tokenizer, components.text_encoder, [item.text]))

    # ---------------------------------------------------------------- geometry

    def latent_factor(self, components: Parts) -> int:
        """Pixels per latent cell: 2^(number of VAE down blocks − 1) (8 for SD, SDXL, SD3 and FLUX), or 1
        for a family without a VAE."""
        if not self.has_vae:
            return 1
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

    def latent_channels(self, components: Parts) -> int:
        return int(components.denoiser.config.in_channels)

    def size_multiple(self, components: Parts) -> int:
        """Image sides must be multiples of this: latent factor × 2^(UNet down blocks − 1)."""
        return self.latent_factor(components) * 2 ** (len(components.unet.config.block_out_channels) - 1)

    def default_size(self, components: Parts) -> int:
        """Default image side in pixels: the UNet's sample size × the latent factor."""
        return int(components.unet.config.sample_size) * self.latent_factor(components)

    def check_video(self, components: Parts, frames: int, scale: float, scale_2: float | None) -> None:
        """Raises a one-line :class:`VideoSettingsError` unless the model makes ``frames`` frames and takes a second
        expert's scale ``scale_2`` (None: none given) beside the guidance scale ``scale``: here images, one frame,
        one denoiser (a video family says which frame counts its VAE takes; Wan 2.2 has a second expert)."""
        if frames != 1:
            raise VideoSettingsError(
                f"frames {frames} given, but {components.source} is {self.description}, which makes images; "
                "give frames (--frames) for video models only"
            )
        check_second_scale(components, self.expert_at, scale, scale_2)

    def latent_shape(self, components: Parts, height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        """(C, h, w) of one image's latents (a video family's: (C, F', h, w) for ``frames`` frames)."""
        factor = self.latent_factor(components)
        return (self.latent_channels(components), height // factor, width // factor)

    def text_key_segments(self, components: Parts) -> list[tuple[Any, int, int]]:
        """How the denoiser's text keys are laid out: (tokenizer, first key, length) per segment; here one
        tokenizer's tokens padded to its ``model_max_length``."""
        return [(components.tokenizer, 0, int(components.tokenizer.model_max_length))]

    text_start_tokens: ClassVar[int] = 1  # start tokens leading the text keys (CLIP's; the bundled tokenizer's)

    def attention_layout(self, components: Parts) -> AttentionLayout:
        """How the denoiser's attention layers hold the text: here a UNet's cross-attention layers (or
        none, for a UNet without them), the tokenizer's start token leading the keys."""
        from negprompt.layers.attention import attention_paths

        kind = "cross" if attention_paths(components.denoiser, "cross") else "none"
        return AttentionLayout(kind, text_start_tokens=self.text_start_tokens)

    # ---------------------------------------------------------------- denoising

    def sampling_defaults(self, components: Parts) -> dict[str, Any]:
        """The family's pipeline defaults for this model (``default_sampling``; a step-distilled FLUX.2 [klein]
        runs at scale 1)."""
        return dict(self.default_sampling)

    def check_guidance(self, components: Parts, guidance: Any, calls: int) -> None:
        """Raises a one-line :class:`~negprompt.errors.NegpromptError` for guidance (a
        ``negprompt.guidance.plan.Guidance`` over ``calls`` denoiser calls) this model cannot take; nothing
        here (a step-distilled FLUX.2 [klein] takes the positive branch alone)."""

    def timestep_settings(self, components: Parts, num_steps: int, height: int, width: int) -> dict[str, Any]:
        """Keywords for ``scheduler.set_timesteps(num_steps, …)`` as the family's pipeline passes them
        (none here; FLUX's σ list and image-size shift μ)."""
        return {}

    def expert_at(self, components: Parts, timestep: torch.Tensor | float) -> int:
        """Which of the model's denoisers predicts at ``timestep``: 0 (the one), or 1 for the second expert of a
        model that has one (Wan 2.2's low-noise ``transformer_2``), whose steps run at the run's ``scale_2``."""
        return 0

    def denoiser_at(self, components: Parts, timestep: torch.Tensor | float) -> Any:
        """The denoiser module that predicts at ``timestep`` (what a rule prepares, e.g. NAG's processors)."""
        return components.denoiser

    def denoisers(self, components: Parts) -> list[Any]:
        """Every denoiser module of the model, indexed as :meth:`expert_at` numbers them (one here; Wan 2.2's
        ``transformer`` and low-noise ``transformer_2``): what attention capture installs its processors on."""
        return [components.denoiser]

    def takes_embedded_guidance(self, components: Parts) -> bool:
        """Whether the denoiser takes the guidance scale as an input (guidance-distilled): a UNet whose
        config has ``time_cond_proj_dim``."""
        return getattr(components.denoiser.config, "time_cond_proj_dim", None) is not None

    def guidance_inputs(self, components: Parts, embedded_guidance: float | None) -> dict[str, torch.Tensor]:
        """The denoiser's inputs for the embedded guidance scale w (one row; :meth:`denoise` expands
        them to the batch), {} for a model that takes none: ``timestep_cond`` (1, dim) for a UNet."""
        if not self.takes_embedded_guidance(components):
            if embedded_guidance is not None:
                raise EmbeddedGuidanceError(
                    f"embedded guidance {embedded_guidance} given, but this model takes no guidance scale as an input"
                )
            return {}
        if embedded_guidance is None:
            raise EmbeddedGuidanceError(
                "this model takes the guidance scale as an input (guidance-distilled): give embedded guidance"
            )
        dim = components.denoiser.config.time_cond_proj_dim
        return {"timestep_cond": guidance_embedding(embedded_guidance, dim).to(components.device, components.dtype)}

    def denoise(
        self,
        components: Parts,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        rows: list[Conditioning],
        guidance_inputs: Mapping[str, torch.Tensor],
        expert: int | None = None,
    ) -> torch.Tensor:
        """One denoiser call: ``latents`` (B, C, h, w) (the scheduler's model input), row i conditioned on
        ``rows[i]``; returns the prediction (B, C, h, w): ε, v or x₀ as the scheduler's prediction type says.
        ``expert``: which of :meth:`denoisers` predicts (the loop picks it per step before the run, without a host
        sync); None: :meth:`expert_at` the timestep. Only a family with two experts (Wan 2.2) reads it."""
        return components.unet(
            latents,
            timestep,
            **denoiser_inputs(rows),
            **{name: value.expand(len(rows), -1) for name, value in guidance_inputs.items()},
            return_dict=False,
        )[0]

    # ---------------------------------------------------------------- images

    def to_pixels(self, components: Parts, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1] (unclamped)."""
        return latents

    def decode(self, components: Parts, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) → images (B, H, W, 3) float32 in [0, 1] (a video family's: (B, C, F', h, w) →
        frames (B, F, H, W, 3))."""
        with torch.no_grad():
            pixels = self.to_pixels(components, latents)
        pixels = (pixels / 2 + 0.5).clamp(0, 1)
        return pixels.cpu().permute(0, 2, 3, 1).float().numpy()

    def __repr__(self) -> str:
        return f"<{self.description}>"
