"""negprompt's rules as diffusers guiders, for diffusers' modular pipelines (docs/guiders.md).

Three subclasses of diffusers' ``BaseGuidance``, each saved and loaded with diffusers' config
(``save_pretrained`` / ``from_pretrained``, ``guider_config.json``):

- :class:`NegativePromptGuidance`, rule (9): ε̂ = ε_ỹ + s(ε_y − ε_ỹ), with the negative's step window;
  outside it ε_∅ replaces ε_ỹ (negprompt's one window semantics), ε̂ = ε_∅ + s(ε_y − ε_∅).
- :class:`DualScaleGuidance`, rule (8): ε̂ = ε_∅ + s⁺(ε_y − ε_∅) − s⁻(ε_ỹ − ε_∅), three branches.
- :class:`PerpNegGuidance`, Perp-Neg (Armandpour et al. 2023): ε̂ = ε_∅ + s[Δ₀ − w·Δ₁^⊥].

A modular pipeline's denoise block hands a guider (conditional, unconditional) pairs of its inputs: the
positive's and the negative's. Rules (8), Perp-Neg, and (9) outside the negative's window also need
ε_∅, the empty prompt's prediction, which no pipeline block encodes beside a negative. The blocks
:class:`StableDiffusionXLNullConditioningStep` and :class:`StableDiffusion3NullConditioningStep` encode
it after the text encoder step and give it to the guider (:meth:`NegpromptGuidance.set_null_conditioning`);
the guider then adds a third batch, ``pred_null``, whose inputs are ∅'s text inputs and the positive's
others (latents, time ids), and the unchanged denoise block evaluates it like any batch.
:func:`with_null_conditioning` inserts the block into a pipeline's blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from diffusers.modular_pipelines.modular_pipeline import BlockState, ModularPipelineBlocks, PipelineState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam

from negprompt.guidance import formulas
from negprompt.guidance.windows import Window

COND, NEGATIVE, NULL = "pred_cond", "pred_uncond", "pred_null"


def parse_window(text: str | None) -> Window:
    """A negative's window ``start:end`` in steps or fractions of the steps (negprompt's syntax), or every step."""
    window = Window() if not text else Window.parse(text)
    if window.economical:
        raise ValueError(f"negative window {text!r}: an evaluation period or an automatic end needs negprompt's loop")
    return window


class NegpromptGuidance(BaseGuidance):
    """What the three guiders share: the negative's window, the ∅ batch, and which batches a step needs.

    Subclasses give :meth:`needs_null` (whether ε_∅ is evaluated at this step) and :meth:`combine`.
    """

    _input_predictions = [COND, NEGATIVE, NULL]

    def __init__(self, negative_window: str | None, start: float, stop: float, enabled: bool):
        super().__init__(start, stop, enabled)
        self.window = parse_window(negative_window)
        self._null_inputs: dict[str, torch.Tensor] | None = None

    def set_null_conditioning(self, inputs: dict[str, torch.Tensor]) -> None:
        """The empty prompt's denoiser inputs by the denoise block's names (``prompt_embeds``, ``text_embeds``,
        ``encoder_hidden_states`` …); set by a null conditioning block before the denoising loop."""
        self._null_inputs = dict(inputs)

    # ------------------------------------------------------------ which branches

    def _guided(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        start, stop = int(self._start * self._num_inference_steps), int(self._stop * self._num_inference_steps)
        return start <= self._step < stop

    def negative_active(self) -> bool:
        """Whether the negative is inside its window at this step (before a step is set: yes)."""
        if self._num_inference_steps is None:
            return True
        return self.window.contains(self._step, self._num_inference_steps)

    def needs_null(self) -> bool:
        raise NotImplementedError

    def predictions_needed(self) -> list[str]:
        """The batches of this step, in the order the denoise block evaluates them."""
        if not self._guided():
            return [COND]
        names = [COND]
        if self.negative_active():
            names.append(NEGATIVE)
        if self.needs_null() or not self.negative_active():
            names.append(NULL)
        return names

    @property
    def num_conditions(self) -> int:
        return len(self.predictions_needed())

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # ------------------------------------------------------------ batches

    def _null_batch(self, data: dict[str, Any]) -> BlockState:
        if self._null_inputs is None:
            raise ValueError(
                f"{type(self).__name__} needs the empty prompt's conditioning at this step: add a null "
                "conditioning block (negprompt.integrations.diffusers_guiders.with_null_conditioning)"
            )
        batch = {}
        for key, value in data.items():
            if key in self._null_inputs:
                batch[key] = self._null_inputs[key]
            elif isinstance(value, tuple):
                batch[key] = value[0]  # latents, time ids: the positive's
            elif value is not None:
                batch[key] = value
        batch[self._identifier_key] = NULL
        return BlockState(**batch)

    def prepare_inputs(self, data: dict[str, Any]) -> list[BlockState]:
        batches = []
        for name in self.predictions_needed():
            if name == NULL:
                batches.append(self._null_batch(data))
            else:
                batches.append(self._prepare_batch(data, 0 if name == COND else 1, name))
        return batches

    def prepare_inputs_from_block_state(self, data: BlockState, input_fields: dict[str, Any]) -> list[BlockState]:
        values = {
            key: getattr(data, value) if isinstance(value, str) else tuple(getattr(data, v) for v in value)
            for key, value in input_fields.items()
        }
        return self.prepare_inputs(values)

    # ------------------------------------------------------------ combination

    def forward(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None = None,
        pred_null: torch.Tensor | None = None,
    ) -> GuiderOutput:
        if not self._guided():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        guided = self.combine(pred_cond, pred_uncond if self.negative_active() else None, pred_null)
        return GuiderOutput(pred=guided, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def combine(self, eps_cond: torch.Tensor, eps_neg: torch.Tensor | None, eps_null: torch.Tensor | None):
        """ε̂ from ε_y, ε_ỹ (None outside the negative's window) and ε_∅ (None where not evaluated)."""
        raise NotImplementedError


class NegativePromptGuidance(NegpromptGuidance):
    """Rule (9), Stable Diffusion's negative prompt with the negative's step window (negprompt rule ``sd``).

    Args:
        guidance_scale: s.
        negative_window: ``start:end`` in steps or fractions of the steps (``"5:"``, ``"0.25:"``); outside
            it ε_∅ takes ε_ỹ's place. None: every step.
        start, stop, enabled: diffusers' switch over the whole schedule (outside it ε̂ = ε_y).
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        negative_window: str | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(negative_window, start, stop, enabled)
        self.guidance_scale = guidance_scale

    def needs_null(self) -> bool:
        return False

    def _guided(self) -> bool:
        return super()._guided() and self.guidance_scale != 1  # eq. (9) at s = 1 is ε_y

    def combine(self, eps_cond, eps_neg, eps_null):
        base = eps_neg if eps_neg is not None else eps_null
        return formulas.sd_negative(base, eps_cond, self.guidance_scale)


class DualScaleGuidance(NegpromptGuidance):
    """Rule (8): three branches ∅, y, ỹ with independent scales s⁺ (``guidance_scale``) and s⁻
    (``negative_scale``; None: s⁺ − 1, which makes (8) equal (9)). Outside its window the negative's term drops."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        negative_scale: float | None = None,
        negative_window: str | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(negative_window, start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.negative_scale = guidance_scale - 1 if negative_scale is None else negative_scale

    def needs_null(self) -> bool:
        return True

    def combine(self, eps_cond, eps_neg, eps_null):
        if eps_neg is None:
            return formulas.cfg(eps_null, eps_cond, self.guidance_scale)
        return formulas.dual_scale(eps_null, eps_cond, eps_neg, self.guidance_scale, self.negative_scale)


class PerpNegGuidance(NegpromptGuidance):
    """Perp-Neg (Armandpour et al. 2023): ε̂ = ε_∅ + s[Δ₀ − w·Δ₁^⊥], Δ₁^⊥ the part of ε_ỹ − ε_∅ orthogonal
    to Δ₀ = ε_y − ε_∅ per sample (negprompt rule ``perp-neg``); ``negative_weight`` w (default 1)."""

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        negative_weight: float = 1.0,
        negative_window: str | None = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(negative_window, start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.negative_weight = negative_weight

    def needs_null(self) -> bool:
        return True

    def combine(self, eps_cond, eps_neg, eps_null):
        negatives, weights = ([eps_neg], [self.negative_weight]) if eps_neg is not None else ([], [])
        return formulas.perp_neg(eps_null, eps_cond, negatives, self.guidance_scale, weights)


# ---------------------------------------------------------------- the block that encodes ε_∅'s inputs


class NullConditioningStep(ModularPipelineBlocks):
    """Encodes the empty prompt as the pipeline's text encoder encodes an absent negative, and gives it to
    a negprompt guider; other guiders are left alone. Subclasses say how a family encodes it."""

    @property
    def description(self) -> str:
        return "Encodes the empty prompt's conditioning (ε_∅'s inputs) for a negprompt guider"

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("prompt_embeds", required=True), InputParam("pooled_prompt_embeds")]

    def null_inputs(self, components: Any, block_state: BlockState) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        block_state = self.get_block_state(state)
        guider = components.guider
        if isinstance(guider, NegpromptGuidance):
            guider.set_null_conditioning(self.null_inputs(components, block_state))
        self.set_block_state(state, block_state)
        return components, state


def _repeat_to(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (1, …) repeated to the batch of ``like``, in its dtype and device."""
    return tensor.to(like.device, like.dtype).expand(like.shape[0], *tensor.shape[1:]).clone()


class StableDiffusionXLNullConditioningStep(NullConditioningStep):
    """SDXL: zeros where the model asks for them (``force_zeros_for_empty_prompt``), else the empty text
    through both encoders; keys ``prompt_embeds`` and ``text_embeds`` of SDXL's denoise block."""

    model_name = "stable-diffusion-xl"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from diffusers.guiders import ClassifierFreeGuidance
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        return [
            ComponentSpec("text_encoder", CLIPTextModel),
            ComponentSpec("text_encoder_2", CLIPTextModelWithProjection),
            ComponentSpec("tokenizer", CLIPTokenizer),
            ComponentSpec("tokenizer_2", CLIPTokenizer),
            ComponentSpec("guider", ClassifierFreeGuidance, default_creation_method="from_config"),
        ]

    def null_inputs(self, components, block_state):
        from diffusers.modular_pipelines.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep

        prompt, pooled = block_state.prompt_embeds, block_state.pooled_prompt_embeds
        if components.config.force_zeros_for_empty_prompt:
            return {"prompt_embeds": torch.zeros_like(prompt), "text_embeds": torch.zeros_like(pooled)}
        embeds, _, pooled_null, _ = StableDiffusionXLTextEncoderStep.encode_prompt(
            components, "", device=prompt.device, prepare_unconditional_embeds=False
        )
        return {"prompt_embeds": _repeat_to(embeds, prompt), "text_embeds": _repeat_to(pooled_null, pooled)}


class StableDiffusion3NullConditioningStep(NullConditioningStep):
    """SD3: the empty text through the CLIP encoders and T5 (``max_sequence_length`` as the text encoder
    step's); keys ``encoder_hidden_states`` and ``text_embeds`` of SD3's denoise block."""

    model_name = "stable-diffusion-3"

    @property
    def inputs(self) -> list[InputParam]:
        return [*super().inputs, InputParam("max_sequence_length", default=256), InputParam("clip_skip")]

    @property
    def expected_components(self) -> list[ComponentSpec]:
        from diffusers.guiders import ClassifierFreeGuidance

        return [ComponentSpec("guider", ClassifierFreeGuidance, default_creation_method="from_config")]

    def null_inputs(self, components, block_state):
        from diffusers.modular_pipelines.stable_diffusion_3.encoders import encode_prompt

        prompt, pooled = block_state.prompt_embeds, block_state.pooled_prompt_embeds
        embeds, _, pooled_null, _ = encode_prompt(
            components,
            prompt="",
            device=prompt.device,
            clip_skip=block_state.clip_skip,
            max_sequence_length=block_state.max_sequence_length,
        )
        return {"encoder_hidden_states": _repeat_to(embeds, prompt), "text_embeds": _repeat_to(pooled_null, pooled)}


NULL_STEPS = {
    "stable-diffusion-xl": StableDiffusionXLNullConditioningStep,
    "stable-diffusion-3": StableDiffusion3NullConditioningStep,
}


def with_null_conditioning(blocks: Any) -> Any:
    """``blocks`` (a modular pipeline's ``SequentialPipelineBlocks``, e.g. ``StableDiffusionXLAutoBlocks()``)
    with the family's null conditioning block inserted after its ``text_encoder`` block."""
    step = NULL_STEPS.get(blocks.model_name)
    if step is None:
        raise ValueError(f"no null conditioning block for {blocks.model_name!r}; there are: {', '.join(NULL_STEPS)}")
    names = list(blocks.sub_blocks)
    blocks.sub_blocks.insert("null_conditioning", step(), names.index("text_encoder") + 1)
    return blocks


def without_progress_bars(blocks: Any) -> Any:
    """``blocks`` with the progress bar of every nested block off (a pipeline's ``set_progress_bar_config``
    reaches only its top-level blocks, not the denoising loop inside ``denoise``)."""
    if hasattr(blocks, "set_progress_bar_config"):
        blocks.set_progress_bar_config(disable=True)
    for block in getattr(blocks, "sub_blocks", {}).values():
        without_progress_bars(block)
    return blocks
