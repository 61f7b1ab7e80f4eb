"""Plain values from the page's fields (sliders send 20.0, seeds travel as text), checked as the command
line checks them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from negprompt.analysis.strength import FUNCTION_WORDS
from negprompt.interfaces.options import seed_list
from negprompt.limits import MAX_SEED
from negprompt.runspec import SettingsError
from negprompt.session import Session


def whole(value: Any, label: str) -> int:
    """``value`` as an int; a float is accepted only when whole (sliders send 20.0)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise SettingsError(f"{label} must be a whole number, got {value!r}")
    return int(value)


def seeds_from(value: Any, images: int, label: str = "seed") -> list[int]:
    """``images`` seeds from the first, ``value``: the text of the page's seed field (parsed as
    ``negprompt generate --seed`` parses one seed: whole, 0–2⁶⁴−1; a number field would round seeds
    above 2⁵³) or an int from the API. Errors quote the value as given."""
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+-").isdigit():  # "0,1" and "0-7" too: the images field says how many
            raise SettingsError(
                f"{label} {text!r}: give one whole number, 0–{MAX_SEED}; the images take the seeds after it"
            )
        try:
            [first] = seed_list(text)
        except argparse.ArgumentTypeError as error:
            raise SettingsError(str(error)) from None
    elif isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{label} must be a whole number 0–{MAX_SEED}, got {value!r}")
    elif not 0 <= value <= MAX_SEED:
        raise SettingsError(f"{label} {value} is outside 0–{MAX_SEED} (a 64-bit generator seed)")
    else:
        first = value
    if first > MAX_SEED - images + 1:
        typed = text if isinstance(value, str) else value
        raise SettingsError(
            f"{label} {typed} leaves no room for {images} images (seeds {typed} and after; the largest seed is "
            f"{MAX_SEED}): give a {label} up to {MAX_SEED - images + 1}, or fewer images"
        )
    return list(range(first, first + images))


def count(value: Any, label: str) -> int:
    """``value`` as a whole number of 1 or more."""
    number = whole(value, label)
    if number < 1:
        raise SettingsError(f"{label} must be 1 or more, got {number}")
    return number


def optional_number(value: Any, label: str) -> float | None:
    """``value`` (a number or the text of one) as a float; None for an empty field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"{label} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{label} must be a number, got {value!r}")
    return float(value)


def example_pair(session: Session) -> tuple[str, str]:
    """The first (prompt, negative) of the model's ``demo_pairs`` (its negprompt.json), else empty texts."""
    declared = session.components.declarations.demo_pairs
    return declared[0] if declared else ("", "")


def content_word(words: Sequence[str]) -> str:
    """The first word that names something (not "a", "with", …), else the first word."""
    return next((word for word in words if word not in FUNCTION_WORDS), words[0])


def word_list(text: str) -> list[str]:
    """Comma-separated words; empty items dropped."""
    return [word.strip() for word in (text or "").split(",") if word.strip()]
