"""What to guide with: the rule, its prompts with scales and windows, as named branches.

A :class:`Guidance` turns user settings into the two things the sampler asks at every step:
which branches the UNet must evaluate (:meth:`Guidance.branches_at`) and how their predictions
combine (:meth:`Guidance.combine`, which calls the pure functions of :mod:`.rules`).

Branch names: ``positive`` (and ``positive_2`` … for extra positives of the weighted rule),
``negative`` (``negative_2`` … for more negatives), ``unconditional`` (the empty prompt, ∅).

Windows, one semantics for every rule: **outside its window a prompt is replaced by the empty
prompt**, i.e. its prediction by ε_∅. Per rule this means:

- ``cfg`` (1): the positive outside its window gives ε̂ = ε_∅ (unconditional steps).
- ``sd`` (2)/(9): the negative outside its window becomes the empty prompt, so the step is plain
  CFG, ε̂ = ε_∅ + s(ε_y − ε_∅): the article's "delayed negative prompt".
- ``dual`` (8): a negative outside its window contributes s⁻(ε_∅ − ε_∅) = 0: its term drops out.
- ``weighted``: a term outside its window drops out of Σ w_i(ε_i − ε_∅).

Default scales make all rules agree with Stable Diffusion's: a negative's scale defaults to
s⁻ = s − 1 (eq. 9) and the weighted rule's negative weight to −(s − 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from negprompt.errors import NegpromptError
from negprompt.guidance import rules
from negprompt.guidance.windows import Window

RULES = {
    "cfg": "classifier-free guidance, eq. (1); no negative prompt",
    "sd": "Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt",
    "dual": "three branches with independent scales s⁺, s⁻, eq. (8)",
    "weighted": "Composable Diffusion: ε_∅ + Σ w_i(ε_i − ε_∅), any number of positives and negatives",
}
UNCONDITIONAL = "unconditional"


class GuidanceError(NegpromptError):
    """Settings that no rule accepts."""


def _check_scale(value: float | None, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GuidanceError(f"{what} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Term:
    """One prompt of the guidance: its text (one for all images, or one per image), scale, window."""

    prompt: str | tuple[str, ...]
    scale: float | None = None  # None: the rule's default (see the module docstring)
    window: Window = field(default_factory=Window)

    def prompts_for(self, batch_size: int) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt] * batch_size
        if len(self.prompt) != batch_size:
            raise GuidanceError(f"{len(self.prompt)} prompts given for a batch of {batch_size} images")
        return list(self.prompt)

    def to_json(self) -> dict:
        prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        return {"prompt": prompt, "scale": self.scale, "window": self.window.to_json()}

    @classmethod
    def from_json(cls, data: Mapping) -> "Term":
        prompt = data["prompt"] if isinstance(data["prompt"], str) else tuple(data["prompt"])
        return cls(prompt, data.get("scale"), Window.from_json(data.get("window")))


@dataclass(frozen=True)
class Guidance:
    """A guidance rule with its prompts. ``scale`` is s (or s⁺): the positive prompt's scale."""

    rule: str = "sd"
    positive: Term = field(default_factory=lambda: Term(""))
    negatives: tuple[Term, ...] = ()
    scale: float = 7.5
    extra_positives: tuple[Term, ...] = ()  # weighted rule only (Composable Diffusion's AND)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise GuidanceError(f"unknown rule {self.rule!r}; choose one of: {', '.join(RULES)}")
        _check_scale(self.scale, "guidance scale")
        if self.positive.scale is not None:
            raise GuidanceError("the positive prompt's scale is the guidance scale; set `scale` instead")
        for term in self.negatives + self.extra_positives:
            _check_scale(term.scale, f"scale of prompt {term.prompt!r}")
        if self.rule == "cfg" and self.negatives:
            raise GuidanceError("rule 'cfg' takes no negative prompt; use 'sd', 'dual' or 'weighted'")
        if self.rule == "sd":
            if len(self.negatives) > 1:
                raise GuidanceError("rule 'sd' takes one negative prompt; use 'dual' or 'weighted' for several")
            if self.negatives and self.negatives[0].scale is not None:
                raise GuidanceError(
                    "rule 'sd' has one scale (s); a negative's own scale needs rule 'dual' or 'weighted'"
                )
        if self.extra_positives and self.rule != "weighted":
            raise GuidanceError(f"several positive prompts need rule 'weighted', not {self.rule!r}")

    # ------------------------------------------------------------ branches

    @property
    def terms(self) -> dict[str, Term]:
        """Every prompt branch by name (the unconditional branch is not a term)."""
        named = {"positive": self.positive}
        for i, term in enumerate(self.extra_positives, start=2):
            named[f"positive_{i}"] = term
        for i, term in enumerate(self.negatives, start=1):
            named["negative" if i == 1 else f"negative_{i}"] = term
        return named

    def negative_scale(self, term: Term) -> float:
        """s⁻ of a negative term: its own, else s − 1 (the value that reduces eq. (8) to (9))."""
        return self.scale - 1.0 if term.scale is None else float(term.scale)

    def validate(self, num_steps: int) -> None:
        """Raises if a window does not fit a schedule of ``num_steps`` UNet calls."""
        for term in self.terms.values():
            term.window.resolve(num_steps)

    def active_terms(self, step: int, num_steps: int) -> set[str]:
        return {name for name, term in self.terms.items() if term.window.contains(step, num_steps)}

    def _uses_unconditional(self, active: set[str]) -> bool:
        if self.rule == "sd":
            # ε_∅ stands in for whichever of the two branches is outside its window.
            return not ({"positive", "negative"} <= active)
        return True

    def branches_at(self, step: int, num_steps: int) -> list[str]:
        """Branches the UNet must evaluate at ``step``, in a fixed order (∅, negatives, positives).

        Inactive branches are not listed (ε_∅ stands in for them); the unconditional branch is
        listed only when the rule needs it at this step.
        """
        active = self.active_terms(step, num_steps)
        names = [UNCONDITIONAL] if self._uses_unconditional(active) else []
        names += [n for n in self.terms if n.startswith("negative") and n in active]
        names += [n for n in self.terms if n.startswith("positive") and n in active]
        return names

    # ------------------------------------------------------------ combination

    def combine(self, predictions: Mapping[str, torch.Tensor], step: int, num_steps: int) -> torch.Tensor:
        """ε̂ from the branch predictions of :meth:`branches_at` (each (B, C, H, W))."""
        active = self.active_terms(step, num_steps)

        def eps(name: str) -> torch.Tensor:
            return predictions[name] if name in active else predictions[UNCONDITIONAL]

        negatives = [n for n in self.terms if n.startswith("negative")]
        if self.rule == "cfg":
            return rules.cfg(predictions[UNCONDITIONAL], eps("positive"), self.scale)
        if self.rule == "sd":
            eps_neg = eps(negatives[0]) if negatives else predictions[UNCONDITIONAL]
            return rules.sd_negative(eps_neg, eps("positive"), self.scale)
        terms = self.terms
        if self.rule == "dual":
            eps_uncond = predictions[UNCONDITIONAL]
            guided = rules.cfg(eps_uncond, eps("positive"), self.scale)
            for name in negatives:
                if name in active:
                    guided = guided - self.negative_scale(terms[name]) * (eps(name) - eps_uncond)
            return guided
        # weighted
        names = [n for n in terms if n in active]
        weights = [self.term_weight(n) for n in names]
        return rules.weighted_sum(predictions[UNCONDITIONAL], [predictions[n] for n in names], weights)

    def term_weight(self, name: str) -> float:
        """w_i of the weighted rule: s for the positive, its scale for extra positives, −s⁻ for negatives."""
        term = self.terms[name]
        if name == "positive":
            return float(self.scale)
        if name.startswith("positive"):
            return float(self.scale if term.scale is None else term.scale)
        return -self.negative_scale(term)

    # ------------------------------------------------------------ serialisation

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "scale": self.scale,
            "positive": self.positive.to_json(),
            "negatives": [t.to_json() for t in self.negatives],
            "extra_positives": [t.to_json() for t in self.extra_positives],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "Guidance":
        return cls(
            rule=data["rule"],
            scale=data["scale"],
            positive=Term.from_json(data["positive"]),
            negatives=tuple(Term.from_json(t) for t in data.get("negatives", [])),
            extra_positives=tuple(Term.from_json(t) for t in data.get("extra_positives", [])),
        )


def simple(prompt: str, negative: str | None = None, scale: float = 7.5, **kwargs) -> Guidance:
    """The common case: one prompt, at most one negative, Stable Diffusion's rule."""
    negatives: Sequence[Term] = () if negative is None else (Term(negative),)
    return Guidance(positive=Term(prompt), negatives=tuple(negatives), scale=scale, **kwargs)
