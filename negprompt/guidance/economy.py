"""Negatives that cost only where they act: an adaptive end of a negative's branch and its reuse.

A negative computed as a denoiser branch (rules ``sd``, eq. (9), and ``dual``, eq. (8)) enters the
guided prediction through its difference to a reference branch,

    Δ_t = ε_ỹ,t − ε_ref,t,   ref = y (the positive) under ``sd``, ∅ under ``dual``,

so ε̂ = ε_y − (s − 1)Δ_t under (9) and ε̂ = ε_∅ + s⁺(ε_y − ε_∅) − s⁻Δ_t under (8). Where Δ_t is not
computed, ε_ỹ,t is stood in for by ε_ref,t + Δ̃_t, with Δ̃_t the last computed Δ (held) or its linear
extrapolation from the last two. Two uses (docs/cheap-negatives.md holds the measurements):

- **``every=K``** (a window's period): Δ is computed every K-th step of the negative's window, held
  in between (K = 1: every step, the plain rule);
- **``end="auto"``**: Δ stops being computed once the change it makes to the predicted clean image,
  e_t = ‖x̂₀(ε_ref + Δ_t) − x̂₀(ε_ref)‖_RMS = κ_t ‖Δ_t‖_RMS (κ_t = |∂x̂₀/∂ε̂|: √(1−ᾱ)/√ᾱ for ε, σ for a
  velocity; the largest over the batch's images), has stayed below :data:`AUTO_THRESHOLD` times its
  largest value so far for :data:`AUTO_MIN_STEPS` computed steps in a row: what the negative still does
  to the image is small against what it did, and the last Δ is held to the end. Measured on the bundled
  model (docs/cheap-negatives.md): e_t peaks in the first two steps and falls ten-fold by step 3–4, where
  stopping keeps the removal; the direction of Δ (cosine, relative change c_t, :func:`relative_change`)
  never settles under an ancestral sampler, so it is recorded, not used. The criterion reads only steps
  already sampled, so the stop is deterministic for the batch's seeds.

The runtime (:class:`NegativeEconomy`) is made per group by the sampling loop: it drops the rows of
the negatives not computed at a step (:meth:`NegativeEconomy.rows_at`) and fills in their predictions
afterwards (:meth:`NegativeEconomy.complete`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from negprompt.guidance.rules.base import UNCONDITIONAL, GuidanceError

if TYPE_CHECKING:
    from torch import Tensor


class Guidance(Protocol):
    """What this module reads of a ``negprompt.guidance.plan.Guidance`` (which calls it while it is checked, so
    it is named here by what it has, not imported)."""

    rule: str
    interval: Any
    terms: Mapping[str, Any]

    @property
    def rule_object(self) -> Any: ...

    def branches_at(self, step: int, num_steps: int) -> Sequence[str]: ...


ECONOMY_RULES = ("sd", "dual")  # rules whose negative is a denoiser row entering linearly through Δ
AUTO_THRESHOLD = 0.1  # e_t below this share of its largest value so far …
AUTO_MIN_STEPS = 2  # … at so many computed steps in a row ends the negative's branch
REUSE = "hold"  # how Δ is stood in for between evaluations: "hold" (last Δ) or "extrapolate" (linear)


def check_economy(guidance: Guidance) -> None:
    """Raises :class:`GuidanceError` (one line) where a window asks for an auto end or a period K > 1 but
    the guidance cannot give it: not on a negative, a rule other than sd/dual, no negative row (NAG, VSF,
    sd at scale 1), or the guidance interval."""
    if guidance.interval is not None and guidance.interval.economical:
        raise GuidanceError("the guidance interval cannot end at auto nor have a period; give START:END steps")
    for name, term in guidance.terms.items():
        window = term.window
        if not window.economical:
            continue
        what = f"window {window.describe()} of {name}"
        if not name.startswith("negative"):
            raise GuidanceError(f"{what}: only a negative's window may end at auto or be evaluated every K steps")
        rule = guidance.rule_object
        if guidance.rule not in ECONOMY_RULES or not rule.negatives_as_rows(guidance):
            why = (
                "does not compute at scale 1"
                if guidance.rule in ECONOMY_RULES
                else "does not combine through ε_ỹ − ε_ref (NAG and VSF have no negative branch)"
            )
            raise GuidanceError(
                f"{what} needs a negative denoiser branch, which rule {guidance.rule!r} {why}; "
                f"use rule {' or '.join(ECONOMY_RULES)} with a scale above 1"
            )


def reference_branch(rule: str) -> str:
    """The branch Δ is taken against: y under ``sd`` (eq. 9), ∅ under ``dual`` (eq. 8)."""
    return UNCONDITIONAL if rule == "dual" else "positive"


def relative_change(current: Tensor, previous: Tensor, steps_apart: int) -> Tensor:
    """c_t = ‖Δ_t − Δ_t′‖ / (‖Δ_t‖ (t − t′)) per image: the relative change of the negative's
    difference per step. current, previous: (B, C, h, w) → (B,)."""
    change = (current - previous).flatten(1).norm(dim=1)
    return change / current.flatten(1).norm(dim=1).clamp_min(1e-12) / steps_apart


def clean_effect(difference: Tensor, clean_factor: float) -> Tensor:
    """e_t = κ_t ‖Δ_t‖_RMS per image: how much Δ moves the predicted clean image x̂₀ (B, C, h, w) → (B,)."""
    return clean_factor * difference.flatten(1).pow(2).mean(dim=1).sqrt()


def has_converged(effects: Sequence[float], threshold: float = AUTO_THRESHOLD, min_steps: int = AUTO_MIN_STEPS) -> bool:
    """Whether the last ``min_steps`` effects e_t (the batch's largest, one per computed step, in order)
    are all below ``threshold`` × the largest so far (the first step never ends the negative)."""
    if len(effects) <= min_steps:
        return False
    peak = max(effects)
    return all(e < threshold * peak for e in effects[-min_steps:])


def stand_in(last: Tensor, last_step: int, step: int, previous: Tensor | None, previous_step: int | None) -> Tensor:
    """Δ̃ at ``step`` from the last computed Δ (at ``last_step``) and, for :data:`REUSE` = "extrapolate",
    the one before: Δ_last + (t − t_last)(Δ_last − Δ_prev)/(t_last − t_prev). (B, C, h, w)."""
    if REUSE == "hold" or previous is None or previous_step is None:
        return last
    return last + (last - previous) * ((step - last_step) / (last_step - previous_step))


@dataclass
class _Held:
    """One negative's computed differences: the last two (Δ, step), the changes c_t, and its stop."""

    last: Tensor | None = None
    last_step: int = -1
    previous: Tensor | None = None
    previous_step: int | None = None
    changes: list[float] = field(default_factory=list)  # c_t (recorded)
    effects: list[float] = field(default_factory=list)  # e_t (the auto end's criterion)
    stopped_at: int | None = None  # first step not computed because the auto end was reached


@dataclass
class NegativeEconomy:
    """Which negative rows a group computes at each step, and the stand-ins for those it does not.

    Made by :meth:`of` for a group whose negatives' windows ask for it (None otherwise: the loop then
    runs exactly as without it). ``windows``: negative name → (period K, auto end).
    """

    reference: str
    windows: Mapping[str, tuple[int, bool]]
    held: dict[str, _Held] = field(default_factory=dict)

    @classmethod
    def of(cls, guidance: Guidance) -> NegativeEconomy | None:
        windows = {
            name: (term.window.every, term.window.is_auto)
            for name, term in guidance.terms.items()
            if name.startswith("negative") and term.window.economical
        }
        if not windows:
            return None
        return cls(reference_branch(guidance.rule), windows)

    def computes(self, name: str, step: int) -> bool:
        """Whether the planned negative ``name`` is computed at ``step`` (else stood in for)."""
        if name not in self.windows:
            return True
        held = self.held.get(name)
        if held is None or held.last is None:
            return True  # first step of its window: nothing to reuse yet
        if held.stopped_at is not None:
            return False
        every, _ = self.windows[name]
        return step - held.last_step >= every

    def rows_at(self, step: int, planned: Sequence[str]) -> tuple[str, ...]:
        """The planned branches less the negatives stood in for at ``step``."""
        for name in self.windows:  # a negative out of its window starts afresh when it comes back
            if name not in planned:
                self.held.pop(name, None)
        return tuple(b for b in planned if self.computes(b, step))

    def complete(
        self, step: int, planned: Sequence[str], predictions: Mapping[str, Tensor], clean_factor: float
    ) -> dict[str, Tensor]:
        """The predictions with a stand-in ε_ref + Δ̃ for each planned negative not computed; records Δ of
        those computed and decides an auto end (``clean_factor``: κ_t of this step). Each prediction
        (B, C, h, w)."""
        completed = dict(predictions)
        for name in self.windows:
            if name not in planned:
                continue
            held = self.held.setdefault(name, _Held())
            reference = predictions[self.reference]
            if name not in predictions:
                if held.stopped_at is not None:  # past an auto end: the last Δ, held
                    completed[name] = reference + held.last
                else:
                    completed[name] = reference + stand_in(
                        held.last, held.last_step, step, held.previous, held.previous_step
                    )
                continue
            difference = predictions[name] - reference
            if held.last is not None:
                change = relative_change(difference, held.last, step - held.last_step)
                held.changes.append(float(change.max()))
            held.effects.append(float(clean_effect(difference, clean_factor).max()))
            held.previous, held.previous_step = held.last, (held.last_step if held.last is not None else None)
            held.last, held.last_step = difference, step
            if self.windows[name][1] and has_converged(held.effects):
                held.stopped_at = step + 1
        return completed

    def stops(self) -> dict[str, int | None]:
        """Each auto-ended negative's first step not computed (None: it ran to its window's end)."""
        return {
            name: (self.held[name].stopped_at if name in self.held else None)
            for name, (_, auto) in self.windows.items()
            if auto
        }


def computed_rows(guidance: Guidance, num_steps: int, stops: Mapping[str, int | None] | None = None) -> int:
    """Denoiser rows per image of a run of ``guidance`` over ``num_steps`` calls, with each auto-ended
    negative stopped at ``stops[name]`` (the run's record; absent or None: not stopped): what the loop
    computes with :class:`NegativeEconomy`, counted without running it."""
    economy = NegativeEconomy.of(guidance)
    stops = stops or {}
    rows = 0
    for step in range(num_steps):
        planned = guidance.branches_at(step, num_steps)
        if economy is None:
            rows += len(planned)
            continue
        computed = economy.rows_at(step, planned)
        rows += len(computed)
        for name in economy.windows:
            if name in computed:
                held = economy.held.setdefault(name, _Held())
                held.last, held.last_step = True, step  # type: ignore[assignment]  # only the step counts here
            stop = stops.get(name)
            if name in economy.held and stop is not None and step + 1 >= stop:
                economy.held[name].stopped_at = stop
    return rows
