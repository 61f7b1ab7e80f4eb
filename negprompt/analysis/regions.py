"""Region finders: where a thing is in a generated image, found without attention maps.

A model that comes with a way to find its things (e.g. ground-truth detectors for a synthetic world)
declares it in its ``negprompt.json``: ``"region_finder": "NAME"`` (an in-memory model:
``Components(..., declarations={"region_finder": "NAME"})``; read as ``components.declarations.region_finder``).
NAME is an entry point of the group ``negprompt.region_finders`` (see the packaging guide: https://packaging.python.org/en/latest/specifications/entry-points/) that
gives a :class:`RegionFinder` class or factory, e.g. in a plugin's ``pyproject.toml``::

    [project.entry-points."negprompt.region_finders"]
    mine = "my_package.regions:MyRegions"

The edit (:mod:`negprompt.analysis.edit`) and the start sweep (:mod:`negprompt.analysis.sweep`) use the
declared finder for the region and the removal of a thing it knows; otherwise they fall back to attention.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Protocol, runtime_checkable

import numpy as np

from negprompt.errors import NegpromptError
from negprompt.models.components import Components

GROUP = "negprompt.region_finders"


class RegionFinderError(NegpromptError):
    """A region finder that is declared but not installed, or that cannot serve a word."""


@runtime_checkable
class RegionFinder(Protocol):
    """Finds a named thing in images of the models it knows, and says whether the thing is there."""

    domain: str  # for messages: whose things these are, e.g. "the bundled world"
    things: tuple[str, ...]  # the words it can find

    def covers(self, components: Components, word: str, size: tuple[int, int]) -> bool:
        """Whether it finds ``word`` in images of ``size`` = (height, width) made by ``components``."""
        ...

    def find(self, image: np.ndarray, word: str) -> tuple[np.ndarray, bool | None]:
        """The thing's region in ``image`` (H, W, 3 in [0, 1]) as an (H, W) bool mask, and whether it is there:
        True, False, or None where the finder cannot read this image (tables count those apart)."""
        ...


def installed_finders() -> dict[str, EntryPoint]:
    """Name → entry point of every region finder installed (the group ``negprompt.region_finders``)."""
    return {point.name: point for point in entry_points(group=GROUP)}


def load_finder(name: str) -> RegionFinder:
    """The installed region finder called ``name``, instantiated."""
    points = installed_finders()
    if name not in points:
        known = ", ".join(sorted(points)) or "none"
        raise RegionFinderError(
            f"region finder {name!r} is not installed (entry-point group {GROUP!r}; installed: {known})"
        )
    finder = points[name].load()()
    if not isinstance(finder, RegionFinder):
        raise RegionFinderError(f"region finder {name!r} lacks domain, things, covers() or find()")
    return finder


def declared_finder(components: Components) -> RegionFinder | None:
    """The region finder the model declares in its ``negprompt.json`` (``Components.declarations``), or None."""
    name = components.declarations.region_finder
    return None if name is None else load_finder(name)
