"""The model families negprompt reads, and the choice of one from ``model_index.json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from negprompt.errors import NegpromptError
from negprompt.models.family import ModelFamily
from negprompt.models.flux import FluxFamily
from negprompt.models.pixel import PixelFamily
from negprompt.models.stable_diffusion import StableDiffusionFamily
from negprompt.models.stable_diffusion_3 import StableDiffusion3Family
from negprompt.models.stable_diffusion_xl import StableDiffusionXLFamily

FAMILIES: tuple[ModelFamily, ...] = (
    StableDiffusionFamily(),
    StableDiffusionXLFamily(),
    PixelFamily(),
    StableDiffusion3Family(),
    FluxFamily(),
)


class UnsupportedModelError(NegpromptError):
    """A model directory of a family negprompt has no adapter for."""


def family_for_index(index: Mapping[str, Any]) -> ModelFamily:
    """The family of a model directory, from its ``_class_name`` and whether it lists a VAE."""
    for family in FAMILIES:
        if family.matches(index):
            return family
    has_vae = (index.get("vae") or [None])[0] is not None
    raise UnsupportedModelError(
        f"model_index.json names {index.get('_class_name', 'no pipeline class')} "
        f"{'with' if has_vae else 'without'} a VAE, which negprompt cannot run; supported: "
        + "; ".join(f.description for f in FAMILIES)
    )


def family_for_parts(parts: Any) -> ModelFamily:
    """The family of parts built in memory: SD3 or FLUX by the transformer's class, SDXL with a second
    text encoder, else Stable Diffusion with a VAE, the pixel family without."""
    transformer = getattr(parts, "transformer", None)
    if transformer is not None:
        return FAMILIES[4] if "Flux" in type(transformer).__name__ else FAMILIES[3]
    if getattr(parts, "text_encoder_2", None) is not None:
        return FAMILIES[1]
    return FAMILIES[0] if parts.vae is not None else FAMILIES[2]
