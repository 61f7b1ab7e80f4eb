"""What to guide with: the rule, its prompts with scales and windows, as named branches.

A :class:`Guidance` turns user settings into what the sampler asks at every step: which branches
the UNet must evaluate (:meth:`Guidance.branches_at`), how their predictions combine
(:meth:`Guidance.combine`, which calls the pure functions of :mod:`.rules`), and, for the two
rules that carry state across steps (``dng``, ``apg`` with momentum), how that state moves on
(:meth:`Guidance.update_state`).

Branch names: ``positive`` (and ``positive_2`` … for extra positives of the weighted rule),
``negative`` (``negative_2`` … for more negatives), ``unconditional`` (the empty prompt, ∅).

Windows, one semantics for every rule: **outside its window a prompt is replaced by the empty
prompt**, i.e. its prediction by ε_∅ (see docs/guidance.md for what that means per rule).
The guidance **interval** is different: outside it there is no guidance at all, ε̂ = ε_y, and only
the positive branch is evaluated (Kynkäänniemi et al. 2024).

Default scales make the rules with a negative agree with Stable Diffusion's: a negative's scale
defaults to s⁻ = s − 1 (eq. 9) and the weighted rule's negative weight to −(s − 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from negprompt.errors import NegpromptError
from negprompt.guidance import rules, syntax
from negprompt.guidance.windows import Window, WindowError

RULES = {
    "cfg": "classifier-free guidance, eq. (1); no negative prompt",
    "sd": "Stable Diffusion's negative prompt, eq. (2)/(9): the negative replaces the empty prompt",
    "dual": "three branches with independent scales s⁺, s⁻, eq. (8)",
    "weighted": "Composable Diffusion: ε_∅ + Σ w_i(ε_i − ε_∅), any number of positives and negatives",
    "perp-neg": "Perp-Neg: subtract only the part of each negative orthogonal to the positive",
    "dng": "Dynamic Negative Guidance: the negative's weight follows p(negative | x_t), tracked over steps",
    "apg": "Adaptive Projected Guidance: CFG with the update's part parallel to ε_y down-weighted",
}
NEGATIVE_RULES = ("sd", "dual", "weighted", "perp-neg", "dng", "apg")
UNCONDITIONAL = "unconditional"


class GuidanceError(NegpromptError):
    """Settings that no rule accepts."""


def _check_scale(value: float | None, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GuidanceError(f"{what} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class RuleSettings:
    """Settings of the rules that have more than scales (defaults: the papers' examples)."""

    dng_strength: float = 5.0  # λ
    dng_prior: float = 0.01  # p(ỹ) before the first step
    dng_p_min: float = 1e-4
    dng_p_max: float = 0.8
    apg_eta: float = 0.0  # weight of the parallel part (1 = CFG)
    apg_norm_threshold: float = 0.0  # r; 0 = no clipping
    apg_momentum: float = 0.0  # β; negative values as in the paper (e.g. −0.5)

    def validate(self) -> None:
        for name, value in asdict(self).items():
            _check_scale(value, name)
        if self.dng_strength < 0:
            raise GuidanceError(f"dng_strength (λ) must be ≥ 0, got {self.dng_strength}")
        if not 0 <= self.dng_p_min < self.dng_p_max < 1:
            raise GuidanceError(
                f"DNG clamp needs 0 ≤ p_min < p_max < 1, got p_min {self.dng_p_min}, p_max {self.dng_p_max}"
            )
        if not self.dng_p_min <= self.dng_prior <= self.dng_p_max:
            raise GuidanceError(
                f"dng_prior {self.dng_prior} must lie in [p_min, p_max] = [{self.dng_p_min}, {self.dng_p_max}]"
            )
        if self.apg_norm_threshold < 0:
            raise GuidanceError(f"apg_norm_threshold must be ≥ 0 (0 = no clipping), got {self.apg_norm_threshold}")
        if not -1 < self.apg_momentum < 1:
            raise GuidanceError(f"apg_momentum must be in (−1, 1), got {self.apg_momentum}")


@dataclass(frozen=True)
class Term:
    """One prompt of the guidance: its text (one for all images, or one per image), scale, window."""

    prompt: str | tuple[str, ...]
    scale: float | None = None  # None: the rule's default (see the module docstring)
    window: Window = field(default_factory=Window)

    def texts_at(self, step: int, num_steps: int, batch_size: int) -> list[str]:
        """Each image's prompt at ``step``: AUTOMATIC1111 edits applied, weights kept."""
        return [syntax.text_at(p, step, num_steps) for p in self.prompts_for(batch_size)]

    def has_text_at(self, step: int, num_steps: int) -> bool:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return any(syntax.plain_text(syntax.text_at(p, step, num_steps)).strip() for p in prompts)

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
    def from_json(cls, data: Mapping) -> Term:
        prompt = data["prompt"] if isinstance(data["prompt"], str) else tuple(data["prompt"])
        return cls(prompt, data.get("scale"), Window.from_json(data.get("window")))


@dataclass
class StepContext:
    """Where a step is in the schedule: its index, the number of steps, ᾱ now and at the next step."""

    step: int
    num_steps: int
    alpha_bar: float = 1.0
    alpha_bar_next: float = 1.0


@dataclass(frozen=True)
class Guidance:
    """A guidance rule with its prompts. ``scale`` is s (or s⁺): the positive prompt's scale."""

    rule: str = "sd"
    positive: Term = field(default_factory=lambda: Term(""))
    negatives: tuple[Term, ...] = ()
    scale: float = 7.5
    extra_positives: tuple[Term, ...] = ()  # weighted rule only (Composable Diffusion's AND)
    rescale: float = 0.0  # guidance rescale φ in [0, 1] (Lin et al. 2023), applied after any rule
    interval: Window | None = None  # steps with guidance; outside, ε̂ = ε_y (Kynkäänniemi et al. 2024)
    settings: RuleSettings = field(default_factory=RuleSettings)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise GuidanceError(f"unknown rule {self.rule!r}; choose one of: {', '.join(RULES)}")
        _check_scale(self.scale, "guidance scale")
        _check_scale(self.rescale, "rescale φ")
        if not 0.0 <= self.rescale <= 1.0:
            raise GuidanceError(f"rescale φ must be in [0, 1], got {self.rescale}")
        self.settings.validate()
        if self.positive.scale is not None:
            raise GuidanceError("the positive prompt's scale is the guidance scale; set `scale` instead")
        for term in self.negatives + self.extra_positives:
            _check_scale(term.scale, f"scale of prompt {term.prompt!r}")
        if self.rule == "cfg" and self.negatives:
            raise GuidanceError("rule 'cfg' takes no negative prompt; use 'sd', 'dual' or 'weighted'")
        if self.rule in ("sd", "dng", "apg"):
            if len(self.negatives) > 1:
                raise GuidanceError(
                    f"rule {self.rule!r} takes one negative prompt; use 'dual', 'weighted' or 'perp-neg' for several"
                )
        if self.rule in ("sd", "apg") and self.negatives and self.negatives[0].scale is not None:
            raise GuidanceError(
                f"rule {self.rule!r} has one scale (s); a negative's own scale needs rule 'dual' or 'weighted'"
            )
        if self.rule in ("perp-neg", "dng") and not self.negatives:
            raise GuidanceError(f"rule {self.rule!r} needs a negative prompt")
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
        """Raises if a window or the interval does not fit a schedule of ``num_steps`` UNet calls."""
        for term in self.terms.values():
            term.window.resolve(num_steps)
            for prompt in [term.prompt] if isinstance(term.prompt, str) else term.prompt:
                late = sorted(s for s in syntax.switch_steps(prompt, num_steps) if s >= num_steps)
                if late:
                    raise WindowError(
                        f"prompt {prompt!r} switches at step {late[0]}, outside the schedule of {num_steps} steps (0–{num_steps - 1})"
                    )
        if self.interval is not None:
            self.interval.resolve(num_steps)

    def guided_at(self, step: int, num_steps: int) -> bool:
        return self.interval is None or self.interval.contains(step, num_steps)

    def active_terms(self, step: int, num_steps: int) -> set[str]:
        """Terms inside their window; a negative whose edited text is empty at this step is not."""
        return {
            name
            for name, term in self.terms.items()
            if term.window.contains(step, num_steps) and (name == "positive" or term.has_text_at(step, num_steps))
        }

    def _uses_unconditional(self, active: set[str]) -> bool:
        if self.rule in ("sd", "apg"):
            # ε_∅ stands in for whichever of the two branches is outside its window.
            return not ({"positive", "negative"} <= active)
        return True

    def branches_at(self, step: int, num_steps: int) -> list[str]:
        """Branches the UNet must evaluate at ``step``, in a fixed order (∅, negatives, positives).

        Inactive branches are not listed (ε_∅ stands in for them); the unconditional branch is
        listed only when the rule needs it at this step; outside the interval only the positive.
        """
        active = self.active_terms(step, num_steps)
        if not self.guided_at(step, num_steps):
            return ["positive"] if "positive" in active else [UNCONDITIONAL]
        names = [UNCONDITIONAL] if self._uses_unconditional(active) else []
        names += [n for n in self.terms if n.startswith("negative") and n in active]
        names += [n for n in self.terms if n.startswith("positive") and n in active]
        return names

    # ------------------------------------------------------------ state

    def new_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        """State carried across steps: DNG's log-odds of the negative, APG's momentum."""
        state: dict[str, torch.Tensor] = {}
        if self.rule == "dng":
            prior = self.settings.dng_prior
            state["dng_log_odds"] = torch.full((batch_size,), math.log(prior / (1 - prior)), dtype=torch.float64)
        return state

    def dng_posterior(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """p(ỹ | x_t) per image, clamped to [p_min, p_max]."""
        p = torch.sigmoid(state["dng_log_odds"])
        return p.clamp(self.settings.dng_p_min, self.settings.dng_p_max)

    # ------------------------------------------------------------ combination

    def combine(
        self,
        predictions: Mapping[str, torch.Tensor],
        step: int,
        num_steps: int,
        state: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """ε̂ from the branch predictions of :meth:`branches_at` (each (B, C, H, W))."""
        active = self.active_terms(step, num_steps)

        def eps(name: str) -> torch.Tensor:
            return predictions[name] if name in active else predictions[UNCONDITIONAL]

        if not self.guided_at(step, num_steps):
            return eps("positive")
        if state is None:
            state = self.new_state(next(iter(predictions.values())).shape[0])
        guided = self._combine_rule(predictions, eps, active, state)
        if self.rescale:
            guided = rules.rescale(guided, eps("positive"), self.rescale)
        return guided

    def _combine_rule(self, predictions, eps, active: set[str], state: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = self.terms
        negatives = [n for n in terms if n.startswith("negative")]
        if self.rule == "cfg":
            return rules.cfg(predictions[UNCONDITIONAL], eps("positive"), self.scale)
        if self.rule == "sd":
            eps_neg = eps(negatives[0]) if negatives else predictions[UNCONDITIONAL]
            return rules.sd_negative(eps_neg, eps("positive"), self.scale)
        if self.rule == "apg":
            base = eps(negatives[0]) if negatives else predictions[UNCONDITIONAL]
            guided, carried = rules.projected(
                base,
                eps("positive"),
                self.scale,
                eta=self.settings.apg_eta,
                norm_threshold=self.settings.apg_norm_threshold,
                momentum=self.settings.apg_momentum,
                previous=state.get("apg_previous"),
            )
            if self.settings.apg_momentum:
                state["apg_previous"] = carried
            return guided
        eps_uncond = predictions[UNCONDITIONAL]
        if self.rule == "dual":
            guided = rules.cfg(eps_uncond, eps("positive"), self.scale)
            for name in negatives:
                if name in active:
                    guided = guided - self.negative_scale(terms[name]) * (eps(name) - eps_uncond)
            return guided
        if self.rule == "perp-neg":
            live = [n for n in negatives if n in active]
            weights = [1.0 if terms[n].scale is None else float(terms[n].scale) for n in live]
            return rules.perp_neg(eps_uncond, eps("positive"), [predictions[n] for n in live], self.scale, weights)
        if self.rule == "dng":
            if "negative" not in active:
                return rules.cfg(eps_uncond, eps("positive"), self.scale)
            strength = self.settings.dng_strength if terms["negative"].scale is None else float(terms["negative"].scale)
            return rules.dynamic_negative(
                eps_uncond, eps("positive"), predictions["negative"], self.scale, strength, self.dng_posterior(state)
            )
        # weighted
        names = [n for n in terms if n in active]
        weights = [self.term_weight(n) for n in names]
        return rules.weighted_sum(eps_uncond, [predictions[n] for n in names], weights)

    def update_state(
        self,
        state: dict[str, torch.Tensor],
        predictions: Mapping[str, torch.Tensor],
        guided: torch.Tensor,
        context: StepContext,
    ) -> None:
        """Moves the state on after a step (DNG's Bayes update of p(ỹ | x))."""
        if self.rule != "dng" or "negative" not in predictions or UNCONDITIONAL not in predictions:
            return
        if context.step + 1 >= context.num_steps:
            return
        change = rules.dng_log_odds_step(
            guided.double(),
            predictions[UNCONDITIONAL].double(),
            predictions["negative"].double(),
            context.alpha_bar,
            context.alpha_bar_next,
        )
        low, high = (
            math.log(p / (1 - p)) if p > 0 else -math.inf for p in (self.settings.dng_p_min, self.settings.dng_p_max)
        )
        state["dng_log_odds"] = (state["dng_log_odds"] + change.cpu()).clamp(low, high)

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
        data = {
            "rule": self.rule,
            "scale": self.scale,
            "positive": self.positive.to_json(),
            "negatives": [t.to_json() for t in self.negatives],
            "extra_positives": [t.to_json() for t in self.extra_positives],
        }
        if self.rescale:
            data["rescale"] = self.rescale
        if self.interval is not None:
            data["interval"] = self.interval.to_json()
        if self.settings != RuleSettings():
            data["settings"] = asdict(self.settings)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> Guidance:
        return cls(
            rule=data["rule"],
            scale=data["scale"],
            positive=Term.from_json(data["positive"]),
            negatives=tuple(Term.from_json(t) for t in data.get("negatives", [])),
            extra_positives=tuple(Term.from_json(t) for t in data.get("extra_positives", [])),
            rescale=data.get("rescale", 0.0),
            interval=Window.from_json(data["interval"]) if data.get("interval") is not None else None,
            settings=RuleSettings(**data.get("settings", {})),
        )


def simple(prompt: str, negative: str | None = None, scale: float = 7.5, **kwargs) -> Guidance:
    """The common case: one prompt, at most one negative, Stable Diffusion's rule."""
    negatives: Sequence[Term] = () if negative is None else (Term(negative),)
    return Guidance(positive=Term(prompt), negatives=tuple(negatives), scale=scale, **kwargs)
