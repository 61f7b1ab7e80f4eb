"""What to guide with: the rule, its prompts with scales and windows, as named branches.

A :class:`Guidance` turns user settings into what the sampler asks at every step: which branches
the UNet must evaluate (:meth:`Guidance.branches_at`), how their predictions combine
(:meth:`Guidance.combine`) and how any state carried across steps moves on
(:meth:`Guidance.update_state`). What each rule does lives in its own module under
:mod:`negprompt.guidance.rules`; this module holds what all rules share: prompts, windows, the
guidance interval and guidance rescale.

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from negprompt.guidance import economy, formulas, syntax
from negprompt.guidance.rules import rule_named
from negprompt.guidance.rules.base import (
    UNCONDITIONAL,
    BranchPredictions,
    GuidanceError,
    Rule,
    RuleSettings,
    StepContext,
    check_number,
    check_scale,
)
from negprompt.guidance.windows import Window, WindowError
from negprompt.layers.layout import AttentionLayout

if TYPE_CHECKING:
    import torch

__all__ = ["UNCONDITIONAL", "Guidance", "GuidanceError", "MicroConditions", "StepContext", "Term"]

# Keys the first PNG format wrote into one shared settings object; each belongs to one rule.
LEGACY_SETTING_PREFIXES = ("dng_", "apg_")


Size = tuple[int, int]


def _size_pair(value: object, what: str, minimum: int) -> Size | None:
    if value is None:
        return None
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__len__")
        or len(value) != 2  # type: ignore[arg-type]
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)  # type: ignore[union-attr]
    ):
        kind = "positive whole numbers" if minimum > 0 else "whole numbers ≥ 0"
        raise GuidanceError(f"{what} must be two {kind} (height, width or top, left), got {value!r}")
    return (int(value[0]), int(value[1]))  # type: ignore[index]


@dataclass(frozen=True)
class MicroConditions:
    """SDXL's size micro-conditions of one prompt (Podell et al. 2023, §2.2), each (height, width) or
    (top, left); None fields take the positive prompt's value, and the positive's take the image size
    (original and target) and (0, 0) (crop)."""

    original_size: Size | None = None
    crops_coords_top_left: Size | None = None
    target_size: Size | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "original_size", _size_pair(self.original_size, "original size", 1))
        object.__setattr__(self, "target_size", _size_pair(self.target_size, "target size", 1))
        object.__setattr__(
            self, "crops_coords_top_left", _size_pair(self.crops_coords_top_left, "crop top-left corner", 0)
        )

    def resolve(self, height: int, width: int, fallback: MicroConditions | None = None) -> tuple[int, ...]:
        """The six time ids (original h, w, crop top, left, target h, w), missing values from ``fallback``
        (resolved first) and then the image size."""
        base = (height, width, 0, 0, height, width) if fallback is None else fallback.resolve(height, width)
        parts = (self.original_size, self.crops_coords_top_left, self.target_size)
        return tuple(v for i, part in enumerate(parts) for v in (part if part is not None else base[2 * i : 2 * i + 2]))

    def describe(self) -> str:
        """``original 512,512; crop 0,0; target 1024,1024`` ((height, width) and (top, left); given fields only)."""
        named = (("original", self.original_size), ("crop", self.crops_coords_top_left), ("target", self.target_size))
        return "; ".join(f"{name} {v[0]},{v[1]}" for name, v in named if v is not None)

    def to_json(self) -> dict:
        return {
            key: list(value)
            for key, value in (
                ("original_size", self.original_size),
                ("crops_coords_top_left", self.crops_coords_top_left),
                ("target_size", self.target_size),
            )
            if value is not None
        }

    @classmethod
    def from_json(cls, data: Mapping) -> MicroConditions:
        unknown = set(data) - {"original_size", "crops_coords_top_left", "target_size"}
        if unknown:
            raise GuidanceError(f"unknown micro-condition(s) {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class Term:
    """One prompt of the guidance: its text (one for all images, or one per image), scale, window.

    SDXL only: ``prompt_2``, the second text encoder's prompt (None: the same as ``prompt``), and
    ``micro``, the prompt's size micro-conditions. Both belong to the branch, so they follow its window.
    """

    prompt: str | tuple[str, ...]
    scale: float | None = None  # None: the rule's default (see the module docstring)
    window: Window = field(default_factory=Window)
    prompt_2: str | tuple[str, ...] | None = None
    micro: MicroConditions | None = None

    def texts_at(self, step: int, num_steps: int, batch_size: int) -> list[str]:
        """Each image's prompt at ``step``: AUTOMATIC1111 edits applied, weights kept."""
        return [syntax.text_at(p, step, num_steps) for p in self.prompts_for(batch_size)]

    def second_texts_at(self, step: int, num_steps: int, batch_size: int) -> list[str | None]:
        """Each image's ``prompt_2`` at ``step`` (None where the term has none)."""
        if self.prompt_2 is None:
            return [None] * batch_size
        return [syntax.text_at(p, step, num_steps) for p in _per_image(self.prompt_2, batch_size)]

    def has_text_at(self, step: int, num_steps: int) -> bool:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if self.prompt_2 is not None:
            prompts += [self.prompt_2] if isinstance(self.prompt_2, str) else list(self.prompt_2)
        return any(syntax.plain_text(syntax.text_at(p, step, num_steps)).strip() for p in prompts)

    def has_input_at(self, step: int, num_steps: int) -> bool:
        """Whether the branch differs from the empty prompt at ``step``: a text, or micro-conditions of its own."""
        return self.micro is not None or self.has_text_at(step, num_steps)

    def prompts_for(self, batch_size: int) -> list[str]:
        return _per_image(self.prompt, batch_size)

    @property
    def all_prompts(self) -> list[str]:
        """Every prompt text of the term (both encoders'), for checks."""
        texts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if self.prompt_2 is not None:
            texts += [self.prompt_2] if isinstance(self.prompt_2, str) else list(self.prompt_2)
        return texts

    def to_json(self) -> dict:
        prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
        data = {"prompt": prompt, "scale": self.scale, "window": self.window.to_json()}
        if self.prompt_2 is not None:
            data["prompt_2"] = self.prompt_2 if isinstance(self.prompt_2, str) else list(self.prompt_2)
        if self.micro is not None:
            data["micro"] = self.micro.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> Term:
        prompt = data["prompt"] if isinstance(data["prompt"], str) else tuple(data["prompt"])
        prompt_2 = data.get("prompt_2")
        if prompt_2 is not None and not isinstance(prompt_2, str):
            prompt_2 = tuple(prompt_2)
        micro = MicroConditions.from_json(data["micro"]) if data.get("micro") is not None else None
        return cls(prompt, data.get("scale"), Window.from_json(data.get("window")), prompt_2, micro)


def _per_image(prompt: str | tuple[str, ...], batch_size: int) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * batch_size
    if len(prompt) != batch_size:
        raise GuidanceError(f"{len(prompt)} prompts given for a batch of {batch_size} images")
    return list(prompt)


@dataclass(frozen=True)
class Guidance:
    """A guidance rule with its prompts. ``scale`` is s (or s⁺): the positive prompt's scale.

    ``settings``: the rule's own options (its ``Settings`` dataclass, or a mapping of option names to
    values); None gives the rule's defaults.
    """

    rule: str = "sd"
    positive: Term = field(default_factory=lambda: Term(""))
    negatives: tuple[Term, ...] = ()
    scale: float = 7.5
    extra_positives: tuple[Term, ...] = ()  # weighted rule only (Composable Diffusion's AND)
    rescale: float = 0.0  # guidance rescale φ in [0, 1] (Lin et al. 2023), applied after any rule
    interval: Window | None = None  # steps with guidance; outside, ε̂ = ε_y (Kynkäänniemi et al. 2024)
    settings: RuleSettings | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        rule = rule_named(self.rule)
        settings = self.settings
        if settings is None:
            settings = rule.Settings()
        elif isinstance(settings, Mapping):
            settings = rule.Settings.from_json(settings)
        elif type(settings) is not rule.Settings:
            raise GuidanceError(
                f"settings {type(settings).__name__} do not belong to rule {self.rule!r}; give {rule.Settings.__name__}"
            )
        object.__setattr__(self, "settings", settings)
        check_scale(self.scale, "guidance scale")
        check_number(self.rescale, "rescale φ")
        if not 0.0 <= self.rescale <= 1.0:
            raise GuidanceError(f"rescale φ must be in [0, 1], got {self.rescale}")
        settings.validate()
        if self.positive.scale is not None:
            raise GuidanceError("the positive prompt's scale is the guidance scale; set `scale` instead")
        for term in self.negatives + self.extra_positives:
            check_scale(term.scale, f"scale of prompt {term.prompt!r}")
        rule.check(self)
        economy.check_economy(self)

    @property
    def rule_object(self) -> Rule:
        """The rule's implementation (see :mod:`negprompt.guidance.rules`)."""
        return rule_named(self.rule)

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
        """Raises if a window, the interval or a prompt edit does not fit a schedule of ``num_steps`` UNet
        calls (checked where a run is specified: ``Session.check``)."""
        for term in self.terms.values():
            term.window.resolve(num_steps)
            for prompt in term.all_prompts:
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
            if term.window.contains(step, num_steps) and (name == "positive" or term.has_input_at(step, num_steps))
        }

    def branches_at(self, step: int, num_steps: int) -> list[str]:
        """Branches the UNet must evaluate at ``step``, in a fixed order (∅, negatives, positives).

        Inactive branches are not listed (ε_∅ stands in for them); the unconditional branch is
        listed only when the rule needs it at this step; outside the interval only the positive.
        """
        active = self.active_terms(step, num_steps)
        if not self.guided_at(step, num_steps):
            return ["positive"] if "positive" in active else [UNCONDITIONAL]
        rule = self.rule_object
        names = [UNCONDITIONAL] if rule.needs_unconditional(self, frozenset(active)) else []
        if rule.negatives_as_rows(self):
            names += [n for n in self.terms if n.startswith("negative") and n in active]
        names += [n for n in self.terms if n.startswith("positive") and n in active]
        return names

    def contexts_at(self, step: int, num_steps: int) -> list[str]:
        """Active negatives the rule reads inside attention layers without denoiser rows (NAG, VSF)."""
        rule = self.rule_object
        if not rule.negatives_as_contexts(self) or not self.guided_at(step, num_steps):
            return []
        rows = set(self.branches_at(step, num_steps))
        active = self.active_terms(step, num_steps)
        return [n for n in self.terms if n.startswith("negative") and n in active and n not in rows]

    # ------------------------------------------------------------ state and combination

    def new_state(self, batch_size: int) -> dict[str, torch.Tensor]:
        """State the rule carries across steps (e.g. DNG's log-odds of the negative, APG's momentum)."""
        return self.rule_object.new_state(self, batch_size)

    def combine(
        self,
        predictions: Mapping[str, torch.Tensor],
        step: int,
        num_steps: int,
        state: dict[str, torch.Tensor] | None = None,
        attention: AttentionLayout | None = None,
    ) -> torch.Tensor:
        """ε̂ from the branch predictions of :meth:`branches_at` (each (B, C, H, W)); ``attention``: the
        model's attention layout, for rules that act per image token (the sampling loop gives it)."""
        active = frozenset(self.active_terms(step, num_steps))
        branches = BranchPredictions(predictions, active, tuple(self.terms), step, num_steps, attention)
        if not self.guided_at(step, num_steps):
            return branches.eps("positive")
        if state is None:
            state = self.new_state(next(iter(predictions.values())).shape[0])
        guided = self.rule_object.combine(self, branches, state)
        if self.rescale:
            guided = formulas.rescale(guided, branches.eps("positive"), self.rescale)
        return guided

    def update_state(
        self,
        state: dict[str, torch.Tensor],
        predictions: Mapping[str, torch.Tensor],
        guided: torch.Tensor,
        context: StepContext,
    ) -> None:
        """Moves the rule's state on after a step (e.g. DNG's Bayes update of p(ỹ | x))."""
        self.rule_object.update_state(self, state, predictions, guided, context)

    # ------------------------------------------------------------ serialisation

    def infotext_fields(self) -> list[str]:
        """The guidance's ``Name: value`` fields of an AUTOMATIC1111-style ``parameters`` text."""
        fields = [f"Rule: {self.rule}"]
        for i, term in enumerate(self.negatives, start=1):
            if term.scale is not None:
                fields.append(f"Negative {i} scale: {term.scale}")
            if not term.window.is_full:
                fields.append(f"Negative {i} window: {term.window.describe()}")
            if term.micro is not None:
                fields.append(f'Negative {i} size conditions: "{term.micro.describe()}"')
        if not self.positive.window.is_full:
            fields.append(f"Positive window: {self.positive.window.describe()}")
        if self.positive.micro is not None:
            fields.append(f'Size conditions: "{self.positive.micro.describe()}"')
        if self.rescale:
            fields.append(f"Guidance rescale: {self.rescale}")
        if self.interval is not None:
            fields.append(f"Guidance interval: {self.interval.describe()}")
        return fields + self.settings.infotext_fields()

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
        if not self.settings.is_default():
            data["settings"] = self.settings.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> Guidance:
        rule = data["rule"]
        settings = dict(data.get("settings") or {})
        own_prefix = rule.replace("-", "_") + "_"
        for key in list(settings):  # the first format stored every rule's options together
            if key.startswith(LEGACY_SETTING_PREFIXES) and not key.startswith(own_prefix):
                del settings[key]
        return cls(
            rule=rule,
            scale=data["scale"],
            positive=Term.from_json(data["positive"]),
            negatives=tuple(Term.from_json(t) for t in data.get("negatives", [])),
            extra_positives=tuple(Term.from_json(t) for t in data.get("extra_positives", [])),
            rescale=data.get("rescale", 0.0),
            interval=Window.from_json(data["interval"]) if data.get("interval") is not None else None,
            settings=settings,
        )
