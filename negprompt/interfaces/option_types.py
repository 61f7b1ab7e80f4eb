"""argparse ``type=`` callables for negprompt's options: each turns one flag's text into a value or raises
``argparse.ArgumentTypeError`` with one line naming what would be accepted (part of the plugin API, re-exported by
:mod:`negprompt.interfaces.options`). Importing it costs argparse only."""

from __future__ import annotations

import argparse
import math

from negprompt.errors import NegpromptError
from negprompt.limits import MAX_FRAMES, MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS


class CommandError(NegpromptError):
    """A user error found by a command itself (re-exported by :mod:`negprompt.interfaces.options`)."""


def whole_number(text: str) -> int:
    """Any integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (1 or more)")
    return value


def step_count(text: str) -> int:
    """A number of inference steps, 1–MAX_STEPS."""
    value = whole_number(text)
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{text!r} steps: give 1–{MAX_STEPS}")
    return value


def negative_period(text: str) -> int:
    """The K of --negative-every: a whole number of steps ≥ 1."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a negative is evaluated every K steps, K ≥ 1 (1: every step)")
    return value


def image_side(text: str) -> int:
    """An image side in pixels, 1–MAX_SIDE."""
    value = whole_number(text)
    if not 1 <= value <= MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{text!r} pixels: give 1–{MAX_SIDE}")
    return value


def frame_count(text: str) -> int:
    """A video's frame count, 1–MAX_FRAMES (the model says which counts it makes: Wan's are 4k + 1)."""
    value = whole_number(text)
    if not 1 <= value <= MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"{text!r} frames: give 1–{MAX_FRAMES}")
    return value


def number(text: str) -> float:
    """Any real number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def finite_number(text: str) -> float:
    """A real number (not nan or ±inf)."""
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0."""
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def guidance_scale(text: str) -> float:
    """A guidance scale: a finite number within ±MAX_SCALE (``negprompt.limits``)."""
    from negprompt.guidance.rules.base import GuidanceError, check_scale

    value = number(text)
    try:
        check_scale(value, "guidance scale")
    except GuidanceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def seed_list(text: str) -> list[int]:
    """``3`` or ``0,1,2`` or ``0-7``: seeds in 0–2⁶⁴−1, at most MAX_IMAGES of them."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                low, high = (int(x) for x in part.split("-", 1))
                if high < low:
                    raise argparse.ArgumentTypeError(
                        f"seed range {part.strip()!r} runs backwards; write it low-high, e.g. {high}-{low}"
                    )
                bounds = [low, high]
            else:
                low = high = int(part)
                bounds = [low]
            for seed in bounds:
                if not 0 <= seed <= MAX_SEED:
                    raise argparse.ArgumentTypeError(f"seed {seed} is outside 0–{MAX_SEED} (a 64-bit generator seed)")
            if len(seeds) + high - low + 1 > MAX_IMAGES:
                raise argparse.ArgumentTypeError(f"seeds {text!r} make over {MAX_IMAGES} images; run them in parts")
            repeated = sorted(set(seeds) & set(range(low, high + 1)))[:1]
            if repeated:
                raise argparse.ArgumentTypeError(
                    f"seed {repeated[0]} is given twice in {text!r}; each seed is one image (and one file)"
                )
            seeds.extend(range(low, high + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: give integers like 3, 0,1,2 or 0-7") from None
    return seeds


def size_condition(text: str) -> tuple[int, int]:
    """``H,W`` (or ``TOP,LEFT``): two whole numbers ≥ 0."""
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be two whole numbers like 1024,1024 (height,width)") from None
    if first < 0 or second < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be two whole numbers ≥ 0")
    return first, second


def embedding_option(text: str) -> tuple[str, str]:
    """``TOKEN=FILE``: a textual-inversion token and its safetensors file."""
    token, sep, path = text.partition("=")
    if not sep or not token or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r} must look like TOKEN=FILE.safetensors, e.g. easynegative=en.safetensors"
        )
    return token, path


def number_range(text: str, flag: str, example: str) -> tuple[float, float]:
    """``LO:HI`` given to ``flag`` as two numbers; a one-line error shows ``example``."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise CommandError(f"{flag} {text!r} must look like LO:HI, e.g. {example}") from None
    return low, high


def sigma_range(text: str) -> tuple[float, float]:
    """The ``LO:HI`` of --interval-sigma."""
    return number_range(text, "--interval-sigma", "0.3:5")
