"""diffusers' two-branch guiders as one negprompt rule: ``--rule guider --guider-name NAME --guider-config JSON``.

diffusers (``diffusers.guiders``, 0.35 and later) composes guidance from guider objects that map the
predictions of two branches, ``pred_cond`` and ``pred_uncond``, to ε̂: CFG, TCFG (Tangential CFG),
FDG (Frequency-Decoupled), MAMBO-G (``MagnitudeAwareGuidance``), APG and its mix, CFG-Zero*. This rule
hands them negprompt's branches in the form of Stable Diffusion's negative prompt, eq. (9):

    pred_cond = ε_y,   pred_uncond = ε_ỹ (the negative's; ε_∅ outside its window or without a negative),

so every guider runs with negprompt's windows, interval, rescale, capture, bench-methods, PNG metadata
and the web page. The guider's ``guidance_scale`` is negprompt's s (``--scale``); its other options
come from ``--guider-config``: JSON text (``{"alpha": 8}``) or a JSON file, stored as JSON text so that
a PNG regenerates the run. The guider's own ``start``/``stop`` apply on top of negprompt's windows.

Guiders that perturb the denoiser (PAG, SEG, SLG, AutoGuidance) are refused: their third branch is the
same prompt through a denoiser with some layers altered by hooks for that pass, while negprompt
evaluates all branches of a step as rows of one denoiser call (docs/guiders.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negprompt.guidance.rules.base import (
    BranchPredictions,
    GuidanceError,
    NegativeAsBase,
    RuleSettings,
    option,
)

if TYPE_CHECKING:
    from torch import Tensor

# diffusers guiders whose forward reads pred_cond and pred_uncond only, from an unchanged denoiser.
TWO_BRANCH_GUIDERS = (
    "ClassifierFreeGuidance",
    "TangentialClassifierFreeGuidance",
    "FrequencyDecoupledGuidance",
    "MagnitudeAwareGuidance",
    "AdaptiveProjectedGuidance",
    "AdaptiveProjectedMixGuidance",
    "ClassifierFreeZeroStarGuidance",
)
# Guiders whose extra branch is a pass through an altered denoiser (or several modalities): why each is refused.
PERTURBATION_GUIDERS = {
    "PerturbedAttentionGuidance": "its third branch replaces self-attention by the identity in chosen layers",
    "SkipLayerGuidance": "its third branch skips chosen transformer blocks",
    "SmoothedEnergyGuidance": "its third branch blurs the queries of chosen attention layers",
    "AutoGuidance": "its unconditional branch runs a degraded denoiser (skipped layers or dropout)",
    "LTX2Guidance": "it combines four branches of an audio-video model (STG and modality passes)",
}
# Options negprompt sets itself: the guider's scale is --scale, its switch is the rule.
OWN_OPTIONS = {"guidance_scale": "set it with --scale", "enabled": "choose another rule to switch it off"}
# Guiders given each prediction as (B, C·H·W, 1): MAMBO-G's ratio ‖ε_y − ε_u‖/‖ε_u‖ is a norm over every
# non-batch dimension, taken in diffusers 0.42 with torch.norm's default Frobenius norm, which accepts two
# dimensions only (a packed FLUX latent (B, L, C), not a UNet's (B, C, H, W)); flattened it is the same norm.
FLATTENED = ("MagnitudeAwareGuidance",)
MOMENTUM = "momentum_buffer"  # the attribute where APG and APG-Mix keep their running average across steps


def canonical_config(text: str) -> str:
    """The guider's options as compact JSON text with sorted keys, from JSON text or a JSON file's path.

    Text that starts with ``{`` or ``[`` is JSON; anything else names a file holding a JSON object.
    """
    source = text.strip()
    where = "--guider-config"
    if source[:1] not in ("{", "["):
        path = Path(source).expanduser()
        where = f"guider config file {source}"
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GuidanceError(
                f"no such guider config file: {text}; give JSON text such as '{{\"alpha\": 8}}' or a JSON file"
            ) from None
        except (OSError, UnicodeDecodeError) as error:
            raise GuidanceError(f"cannot read guider config file {text}: {error}") from None
    try:
        data = json.loads(source)
    except json.JSONDecodeError as error:
        raise GuidanceError(
            f"{where} is not JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            'give a JSON object such as {"alpha": 8}'
        ) from None
    if not isinstance(data, dict):
        raise GuidanceError(f"{where} must be a JSON object of the guider's options, got {type(data).__name__}")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class GuiderSettings(RuleSettings):
    """Which diffusers guider, and its options as JSON text (a file's content once read)."""

    rule = "guider"
    name: str = option("ClassifierFreeGuidance", f"diffusers guider class: {', '.join(TWO_BRANCH_GUIDERS)}")
    config: str = option("{}", "the guider's options: JSON text or a JSON file (guidance_scale is --scale)")

    def __post_init__(self) -> None:
        if isinstance(self.config, str):
            object.__setattr__(self, "config", canonical_config(self.config))

    def validate(self) -> None:
        super().validate()
        if self.name in PERTURBATION_GUIDERS:
            raise GuidanceError(
                f"guider {self.name!r} is not supported: {PERTURBATION_GUIDERS[self.name]}, a denoiser pass of its own, "
                f"while negprompt evaluates a step's branches as rows of one call; choose one of: "
                f"{', '.join(TWO_BRANCH_GUIDERS)}"
            )
        if self.name not in TWO_BRANCH_GUIDERS:
            raise GuidanceError(
                f"unknown diffusers guider {self.name!r}; choose one of: {', '.join(TWO_BRANCH_GUIDERS)}"
            )
        for key, why in OWN_OPTIONS.items():
            if key in self.options_json():
                raise GuidanceError(f"--guider-config sets {key!r}, which negprompt sets: {why}")

    def options_json(self) -> dict[str, Any]:
        """The guider's options as a dict."""
        return json.loads(self.config)


def guider_class(name: str) -> type:
    """The diffusers guider class called ``name`` (one of :data:`TWO_BRANCH_GUIDERS`)."""
    import diffusers.guiders

    found = getattr(diffusers.guiders, name, None)
    if found is None:
        raise GuidanceError(f"this diffusers has no guider {name!r}; choose one of: {', '.join(TWO_BRANCH_GUIDERS)}")
    return found


def build_guider(settings: GuiderSettings, scale: float) -> Any:
    """A diffusers guider of ``settings`` at guidance scale ``scale`` (for guiders that take one); its
    errors (an option it does not have, a bound, a missing package) as one :class:`GuidanceError` line."""
    import inspect

    cls = guider_class(settings.name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    options = settings.options_json()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        shown = ", ".join(p for p in accepted if p not in OWN_OPTIONS)
        raise GuidanceError(f"guider {settings.name!r} has no option {unknown[0]!r}; its options: {shown}")
    if "guidance_scale" in accepted:
        options["guidance_scale"] = scale
    try:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "guiders are experimental", once per guider built
        try:
            return cls(**options)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    except (TypeError, ValueError, ImportError) as error:
        message = " ".join(str(error).split())
        raise GuidanceError(f"guider {settings.name!r} refuses {settings.config}: {message}") from None


def guide(guider: Any, eps_cond: Tensor, eps_uncond: Tensor, step: int, num_steps: int, carried: Tensor | None):
    """ε̂ of ``guider`` at ``step`` of ``num_steps``, as a diffusers modular pipeline calls it: state, the
    batches it asks for (one when it is off at this step), their predictions, then the guider.

    ``carried``: the guider's momentum running average from the previous step (APG, APG-Mix), or None.
    Returns (ε̂ (B, C, H, W), the running average to carry or None).
    """
    guider.set_state(step=0, num_inference_steps=num_steps, timestep=None)
    guider.prepare_inputs({})  # at step 0 a guider makes its per-run buffers (APG's momentum)
    guider.set_state(step=step, num_inference_steps=num_steps, timestep=None)
    batches = guider.prepare_inputs({})  # the batches' identifiers: pred_cond, and pred_uncond when guided
    buffer = getattr(guider, MOMENTUM, None)
    if buffer is not None and carried is not None and step > 0:
        buffer.running_average = carried
    shape = eps_cond.shape
    if type(guider).__name__ in FLATTENED:
        eps_cond, eps_uncond = eps_cond.reshape(shape[0], -1, 1), eps_uncond.reshape(shape[0], -1, 1)
    predictions = {"pred_cond": eps_cond, "pred_uncond": eps_uncond}
    for batch in batches:
        batch.noise_pred = predictions[getattr(batch, guider._identifier_key)]
    guided = guider(batches).pred.reshape(shape)
    buffer = getattr(guider, MOMENTUM, None)
    running = getattr(buffer, "running_average", None)
    return guided, running if running is not None and not isinstance(running, (int, float)) else None


class DiffusersGuider(NegativeAsBase):
    """A diffusers guider on (ε_y, ε_ỹ): the negative is its ``pred_uncond``, as in rule ``sd``."""

    name = "guider"
    listing_order = 90
    summary = "a diffusers guider (TCFG, FDG, MAMBO-G, APG-Mix, …) with the negative as pred_uncond, eq. (9)"
    Settings = GuiderSettings

    def check(self, guidance) -> None:
        super().check(guidance)
        build_guider(guidance.settings, guidance.scale)  # its options, before a run

    def combine(self, guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        guider = build_guider(guidance.settings, guidance.scale)  # a fresh one per call: no state shared by runs
        guided, running = guide(
            guider,
            branches.eps("positive"),
            self.base(branches),
            branches.step,
            branches.num_steps,
            state.get("guider_momentum"),
        )
        if running is not None:
            state["guider_momentum"] = running
        return guided


RULE = DiffusersGuider()
