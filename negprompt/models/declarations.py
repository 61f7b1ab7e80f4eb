"""What a model declares of itself in its ``negprompt.json``: default sampling, limits, a region finder, demo prompts.

The file is optional and every field in it is too, e.g. the bundled model's::

    {"scheduler": "euler-a", "steps": 20, "scale": 5.0, "region_finder": "shapes", "max_sigma": 40.0,
     "demo_pairs": [["a red circle", "a hat"], ...]}

It is parsed and checked once, when the model is loaded (:func:`negprompt.models.loading.load_components`);
a field of the wrong type, or one negprompt does not know, is refused in one line naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from negprompt.errors import NegpromptError

DECLARATIONS_FILE = "negprompt.json"  # in the model's folder, beside model_index.json


class DeclarationsError(NegpromptError):
    """A ``negprompt.json`` field of the wrong type or an unknown field."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(text, str) for text in value)


# Each field: (check, what is accepted). Values are kept as given (a scale of 5 stays an int), so that
# the settings recorded from them (PNG metadata, studies) are the ones the file gave.
_ACCEPTED = {
    "scheduler": (lambda v: isinstance(v, str) and bool(v), 'a scheduler name such as "euler-a"'),
    "steps": (lambda v: _is_whole(v) and v >= 1, "a whole number of steps, at least 1"),
    "scale": (_is_number, "a number (the CFG scale s)"),
    "embedded_guidance": (_is_number, "a number (the guidance scale w a distilled model takes)"),
    "region_finder": (lambda v: isinstance(v, str) and bool(v), "the name of a region finder's entry point"),
    "max_sigma": (lambda v: _is_number(v) and v > 0, "a positive number (the largest first noise level σ)"),
    "max_sequence_length": (lambda v: _is_whole(v) and v >= 1, "a whole number of T5 tokens, at least 1"),
    "demo_pairs": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_pair(p) for p in v),
        "a list of [prompt, negative] pairs of texts",
    ),
}


@dataclass(frozen=True)
class Declarations(Mapping[str, Any]):
    """The fields of a model's ``negprompt.json``; None where the file gives none.

    Read as attributes (``declarations.max_sigma``). It is also a read-only mapping of the fields the
    file gave, the JSON object itself (:meth:`to_json`), so ``{**defaults, **declarations}`` lays the
    model's declared defaults over others.
    """

    scheduler: str | None = None  # default scheduler name
    steps: int | None = None  # default step count
    scale: float | None = None  # default CFG scale s
    embedded_guidance: float | None = None  # default w of a guidance-distilled model
    region_finder: str | None = None  # entry point of negprompt.region_finders (negprompt.analysis.regions)
    max_sigma: float | None = None  # runs whose first noise level σ exceeds this are refused
    max_sequence_length: int | None = None  # T5 tokens of SD3 / FLUX (default: the pipeline's)
    demo_pairs: tuple[tuple[str, str], ...] | None = None  # (prompt, negative) rows of ``negprompt demo``

    @classmethod
    def from_json(cls, data: Any) -> Declarations:
        """Parses the JSON object of a ``negprompt.json``; raises :class:`DeclarationsError` in one line."""
        if isinstance(data, Declarations):
            return data
        if not isinstance(data, Mapping):
            raise DeclarationsError('must hold a JSON object such as {"steps": 20, "scale": 7.5}')
        for key, value in data.items():
            if key not in _ACCEPTED:
                raise DeclarationsError(f"unknown field {key!r}; the fields are {', '.join(_ACCEPTED)}")
            check, accepted = _ACCEPTED[key]
            if not check(value):
                raise DeclarationsError(f"{key} must be {accepted}, got {value!r}")
        values = dict(data)
        if "demo_pairs" in values:
            values["demo_pairs"] = tuple((prompt, negative) for prompt, negative in values["demo_pairs"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The JSON object: the fields given, in the order of :class:`Declarations`."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if "demo_pairs" in data:
            data["demo_pairs"] = [list(pair) for pair in data["demo_pairs"]]
        return data

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())
