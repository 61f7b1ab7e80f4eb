"""The shapes world's region finder: its ground-truth detectors locate a thing and say whether it is there.

Registered as the entry point ``shapes`` of the group ``negprompt.region_finders`` (``pyproject.toml``);
the bundled model's ``negprompt.json`` declares ``"region_finder": "shapes"``, so ``negprompt edit``
(region ``auto`` or ``detector``) uses it for the world's things (see :mod:`negprompt.analysis.regions`).
"""

from __future__ import annotations

import numpy as np

from negprompt.analysis.locality import dilate
from negprompt.api import to_uint8
from negprompt.models.components import Components
from negprompt.shapes.detectors import detect
from negprompt.shapes.scene import ADJECTIVES, IMAGE_SIZE, NOUNS

NAME = "shapes"  # the entry point's name, which a model's negprompt.json names
WORLD_THINGS = NOUNS + ADJECTIVES


def detector_region(image: np.ndarray, word: str) -> tuple[np.ndarray, bool | None]:
    """The thing's region in ``image`` (H, W, 3 in [0, 1]) as an (H, W) bool mask, and whether the detectors find it
    (None: they cannot read it in this image, see ``negprompt.shapes.detectors.UNREADABLE``).

    A noun's region is its detected pixels and ``striped``'s the object's, each dilated by one pixel;
    ``blurry``'s is the whole image.
    """
    found = detect(to_uint8(image))
    present = None if found.unreadable(word) else bool(getattr(found, word))
    if word in NOUNS:
        region = found.regions.get(word, np.zeros(image.shape[:2], bool))
    elif word == "striped":
        region = found.regions.get("object", np.zeros(image.shape[:2], bool))
    else:  # blurry: the whole image
        region = np.ones(image.shape[:2], bool)
    return dilate(region, 1) if word != "blurry" else region, present


class ShapesRegions:
    """:class:`negprompt.analysis.regions.RegionFinder` for the world's things in pixel-space 32×32 images."""

    domain = "the bundled world"
    things: tuple[str, ...] = WORLD_THINGS

    def covers(self, components: Components, word: str, size: tuple[int, int]) -> bool:
        return word in self.things and size == (IMAGE_SIZE, IMAGE_SIZE) and components.vae is None

    def find(self, image: np.ndarray, word: str) -> tuple[np.ndarray, bool | None]:
        return detector_region(image, word)
