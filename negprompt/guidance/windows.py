"""Step windows: the part of the schedule in which a prompt is active.

Steps are counted by UNet call, 0 … N−1, where N = ``len(scheduler.timesteps)`` (for PNDM with
30 inference steps N = 31, as in the article's code). A window [start, end) is given either as
step indices (ints, 0 ≤ start < end ≤ N) or as fractions of the schedule (floats in [0, 1]); a
fraction f stands for step ``floor(f · N)``. ``end=None`` means "to the last step".

A negative's window may also say how it is computed (docs/cheap-negatives.md): ``end="auto"`` ends it where
its effect has converged (decided while sampling, :mod:`negprompt.guidance.economy`), and ``every=K``
evaluates it every K-th step, its difference to the reference branch reused in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from negprompt.errors import NegpromptError


class WindowError(NegpromptError):
    """A window that does not fit the schedule."""


AUTO = "auto"  # the end of a window decided while sampling, where the negative's effect has converged


def check_sigma_interval(low: float, high: float) -> None:
    """A guidance interval in noise levels σ_lo:σ_hi: finite, 0 ≤ σ_lo < σ_hi."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise WindowError(f"noise-level interval needs 0 ≤ σ_lo < σ_hi, got {low}:{high}")


@dataclass(frozen=True)
class Window:
    """The steps [start, end) in which a prompt is active; the default covers every step."""

    start: int | float = 0
    end: int | float | str | None = None  # str: only AUTO
    every: int = 1  # evaluated every K-th step of the window, reused in between (negatives of sd, dual)

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise WindowError(f"negative evaluation period must be a whole number of steps ≥ 1, got {self.every!r}")
        for name, value in (("start", self.start), ("end", self.end)):
            if value is None or (name == "end" and value == AUTO):
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
        whole = self.end is None or (isinstance(self.end, float) and self.end == 1.0)
        return self.start == 0 and whole and self.every == 1

    @property
    def is_auto(self) -> bool:
        """Whether the end is decided while sampling (``START:auto``)."""
        return self.end == AUTO

    @property
    def economical(self) -> bool:
        """Whether the branch is computed at fewer steps than its window holds (an auto end or every > 1)."""
        return self.is_auto or self.every > 1

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
        end = num_steps if self.end is None or self.end == AUTO else to_index(self.end, "end")
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
        return f"[{self.start}, {end})" + (f" every {self.every}" if self.every != 1 else "")

    def to_json(self) -> list:
        return [self.start, self.end] if self.every == 1 else [self.start, self.end, self.every]

    @classmethod
    def from_json(cls, value: list | None) -> "Window":
        if value is None:
            return cls()
        if isinstance(value, str) or not hasattr(value, "__len__") or len(value) not in (2, 3):
            raise WindowError(f"a window is [start, end] or [start, end, every], got {value!r}")
        return cls(*value)

    @classmethod
    def parse(cls, text: str) -> "Window":
        """Parses ``START:END`` (either side may be empty); a value with a dot is a fraction.

        ``5:`` = from step 5 on; ``:0.5`` = the first half; ``0.25:0.75`` = the middle half; ``0:auto`` =
        from step 0 until the negative's effect has converged (negatives of rules sd and dual).
        """
        if ":" not in text:
            raise WindowError(f"window {text!r} must look like START:END, e.g. 5:, :0.5 or 0.25:0.75")
        start_text, end_text = (part.strip() for part in text.split(":", 1))

        def number(part: str, default, may_be_auto: bool = False):
            if part == "":
                return default
            if part == AUTO and may_be_auto:
                return AUTO
            try:
                return float(part) if any(c in part for c in ".eE") else int(part)
            except ValueError:
                also = " (the end may also be auto)" if may_be_auto else ""
                raise WindowError(f"window {text!r}: {part!r} is not a step index or a fraction{also}") from None

        return cls(number(start_text, 0), number(end_text, None, may_be_auto=True))
