"""Step windows: the part of the schedule in which a prompt is active.

Steps are counted by UNet call, 0 … N−1, where N = ``len(scheduler.timesteps)`` (for PNDM with
30 inference steps N = 31, as in the article's code). A window [start, end) is given either as
step indices (ints, 0 ≤ start < end ≤ N) or as fractions of the schedule (floats in [0, 1]); a
fraction f stands for step ``floor(f · N)``. ``end=None`` means "to the last step".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from negprompt.errors import NegpromptError


class WindowError(NegpromptError):
    """A window that does not fit the schedule."""


def check_sigma_interval(low: float, high: float) -> None:
    """A guidance interval in noise levels σ_lo:σ_hi: finite, 0 ≤ σ_lo < σ_hi."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise WindowError(f"noise-level interval needs 0 ≤ σ_lo < σ_hi, got {low}:{high}")


@dataclass(frozen=True)
class Window:
    """The steps [start, end) in which a prompt is active; the default covers every step."""

    start: int | float = 0
    end: int | float | None = None

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WindowError(f"window {name} must be a step index (int) or a fraction (float), got {value!r}")
            if isinstance(value, float) and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise WindowError(f"window {name} {value} is not a fraction in [0, 1]")
            if isinstance(value, int) and value < 0:
                raise WindowError(f"window {name} {value} is negative; steps count from 0")

    @property
    def is_full(self) -> bool:
        # The end 1.0 (a fraction) is the whole schedule; the end 1 (a step index) is step 0 alone.
        return self.start == 0 and (self.end is None or (isinstance(self.end, float) and self.end == 1.0))

    def resolve(self, num_steps: int) -> tuple[int, int]:
        """The window as step indices [start, end) for a schedule of ``num_steps`` UNet calls."""

        def to_index(value: int | float, name: str) -> int:
            if isinstance(value, float):
                return math.floor(value * num_steps)
            if value > num_steps:
                raise WindowError(
                    f"window {name} {value} is outside the schedule: steps are 0–{num_steps - 1} "
                    f"(end may be {num_steps}), or give fractions in [0, 1]"
                )
            return value

        start = to_index(self.start, "start")
        end = num_steps if self.end is None else to_index(self.end, "end")
        if start >= end:
            raise WindowError(
                f"window [{self.start}, {self.end}) is empty on a schedule of {num_steps} steps "
                f"(start {start} ≥ end {end}); start must be below end"
            )
        return start, end

    def contains(self, step: int, num_steps: int) -> bool:
        start, end = self.resolve(num_steps)
        return start <= step < end

    def describe(self) -> str:
        end = "end" if self.end is None else self.end
        return f"[{self.start}, {end})"

    def to_json(self) -> list:
        return [self.start, self.end]

    @classmethod
    def from_json(cls, value: list | None) -> "Window":
        if value is None:
            return cls()
        start, end = value
        return cls(start, end)

    @classmethod
    def parse(cls, text: str) -> "Window":
        """Parses ``START:END`` (either side may be empty); a value with a dot is a fraction.

        ``5:`` = from step 5 on; ``:0.5`` = the first half; ``0.25:0.75`` = the middle half.
        """
        if ":" not in text:
            raise WindowError(f"window {text!r} must look like START:END, e.g. 5:, :0.5 or 0.25:0.75")
        start_text, end_text = (part.strip() for part in text.split(":", 1))

        def number(part: str, default):
            if part == "":
                return default
            try:
                return float(part) if any(c in part for c in ".eE") else int(part)
            except ValueError:
                raise WindowError(f"window {text!r}: {part!r} is not a step index or a fraction") from None

        return cls(number(start_text, 0), number(end_text, None))
