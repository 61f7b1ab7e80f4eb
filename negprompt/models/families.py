"""The model families negprompt reads, by name, and the choice of one for a model directory or parts in memory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from negprompt.errors import NegpromptError
from negprompt.models.chroma import ChromaFamily
from negprompt.models.family import ModelFamily
from negprompt.models.flux import FluxFamily
from negprompt.models.flux2_klein import Flux2KleinFamily
from negprompt.models.pixel import PixelFamily
from negprompt.models.qwen_image import QwenImageFamily
from negprompt.models.stable_diffusion import StableDiffusionFamily
from negprompt.models.stable_diffusion_3 import StableDiffusion3Family
from negprompt.models.stable_diffusion_xl import StableDiffusionXLFamily
from negprompt.models.wan import WanFamily
from negprompt.models.z_image import ZImageFamily

# Every family, by its name; a new family is one module and one line here.
FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        StableDiffusionFamily(),
        StableDiffusionXLFamily(),
        PixelFamily(),
        StableDiffusion3Family(),
        FluxFamily(),
        Flux2KleinFamily(),
        ZImageFamily(),
        ChromaFamily(),
        QwenImageFamily(),
        WanFamily(),
    )
}


class UnsupportedModelError(NegpromptError):
    """A model directory of a family negprompt has no adapter for."""


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (e.g. ``"stable-diffusion-xl"``)."""
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedModelError(f"no model family {name!r}; families: {', '.join(FAMILIES)}")
    return family


def family_for_index(index: Mapping[str, Any]) -> ModelFamily:
    """The family of a model directory, from its ``_class_name`` and whether it lists a VAE."""
    for family in FAMILIES.values():
        if family.matches(index):
            return family
    has_vae = (index.get("vae") or [None])[0] is not None
    raise UnsupportedModelError(
        f"model_index.json names {index.get('_class_name', 'no pipeline class')} "
        f"{'with' if has_vae else 'without'} a VAE, which negprompt cannot run; supported: "
        + "; ".join(f.description for f in FAMILIES.values())
    )


def family_for_parts(parts: Any) -> ModelFamily:
    """The family of parts built in memory: the one whose :meth:`ModelFamily.matches_parts` accepts them."""
    found = [family for family in FAMILIES.values() if family.matches_parts(parts)]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"parts with denoiser {type(parts.denoiser).__name__} match {len(found)} families "
            f"({', '.join(f.name for f in found) or 'none'}); supported: "
            + "; ".join(f.description for f in FAMILIES.values())
        )
    return found[0]
