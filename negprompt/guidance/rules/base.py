"""What a guidance rule is: one protocol, typed settings, and the step's branch predictions.

A rule is one module under :mod:`negprompt.guidance.rules` holding one :class:`Rule` object. The rule
says which branches it needs at a step, how it combines their predictions (by calling the pure
formulas of :mod:`negprompt.guidance.formulas` or its own), what state it carries across steps, and
may prepare the denoiser for a run and a step (install attention processors once per run, give them
the negative's conditioning at each call: the seam for rules that act inside attention layers). Its options are a frozen
dataclass of :class:`RuleSettings` whose fields carry their help text; the command line, the PNG
infotext and the JSON are generated from them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from negprompt.errors import NegpromptError
from negprompt.layers.layout import AttentionLayout
from negprompt.limits import MAX_SCALE

if TYPE_CHECKING:  # rules are declared without importing torch (the command line lists their options)
    from torch import Tensor
UNCONDITIONAL = "unconditional"


class GuidanceError(NegpromptError):
    """Settings that no rule accepts."""


def check_number(value: Any, what: str) -> None:
    """Raises unless ``value`` is a finite int or float (None passes: "use the default")."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GuidanceError(f"{what} must be a finite number, got {value!r}")


SCALE_USE = "guidance scales are used at 1–20"
WEIGHS_A_TERM = "it weighs a guidance term, and beyond that the result is saturated noise"


def check_scale(value: float | None, what: str, why: str = SCALE_USE) -> None:
    """Raises unless ``value`` is None or a finite number within ±MAX_SCALE: a guidance scale, or a rule
    option that multiplies a guidance term (``why``: WEIGHS_A_TERM), saturates the prediction beyond it."""
    check_number(value, what)
    if value is not None and abs(value) > MAX_SCALE:
        raise GuidanceError(f"{what} {value:g} is outside ±{MAX_SCALE:g}; {why}")


# ---------------------------------------------------------------- settings


def option(default: float | int | str, help: str, *, flag: str | None = None, unit: str = "") -> Any:
    """A settings field: its default, a help line, the command-line name (default: the field's) and unit.
    A ``str`` field is text (e.g. a name or JSON); every other field is a number."""
    from dataclasses import field

    return field(default=default, metadata={"help": help, "flag": flag, "unit": unit})


@dataclass(frozen=True)
class RuleSettings:
    """Typed options of one rule (a frozen dataclass of :func:`option` fields). Base: no options.

    Each field is known outside the rule by its qualified name ``<rule>_<field>`` (``dng_strength``):
    in error messages, the infotext and the command line (``--dng-lambda`` where the field sets a flag).
    """

    rule: ClassVar[str] = ""

    @classmethod
    def options(cls) -> tuple[Field, ...]:
        return fields(cls)

    @classmethod
    def qualified(cls, name: str) -> str:
        return f"{cls.rule.replace('-', '_')}_{name}"

    @classmethod
    def flag(cls, option_field: Field) -> str:
        """The command-line flag of a field, e.g. ``--dng-lambda``."""
        return f"--{cls.rule}-{(option_field.metadata.get('flag') or option_field.name).replace('_', '-')}"

    @classmethod
    def kind(cls, option_field: Field) -> type:
        """int, float or str: the type a field's values must have."""
        if option_field.type in (str, "str"):
            return str
        return int if option_field.type in (int, "int") else float

    def validate(self) -> None:
        """Finite numbers (or text) of the right kind; subclasses add their bounds (and call this first)."""
        for option_field in self.options():
            value = getattr(self, option_field.name)
            if self.kind(option_field) is str:
                if not isinstance(value, str):
                    raise GuidanceError(f"{self.qualified(option_field.name)} must be text, got {value!r}")
                continue
            check_number(value, self.qualified(option_field.name))
            if self.kind(option_field) is int and not isinstance(value, int):
                raise GuidanceError(f"{self.qualified(option_field.name)} must be an integer, got {value!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuleSettings:
        """Settings from field names or qualified names (``strength`` or ``dng_strength``)."""
        known = {f.name for f in cls.options()}
        prefix = cls.qualified("")
        values = {}
        for key, value in data.items():
            name = key[len(prefix) :] if key.startswith(prefix) and key[len(prefix) :] in known else key
            if name not in known:
                accepted = ", ".join(sorted(known)) or "none"
                raise GuidanceError(f"rule {cls.rule!r} has no option {key!r}; its options: {accepted}")
            values[name] = value
        return cls(**values)

    def is_default(self) -> bool:
        return all(getattr(self, f.name) == f.default for f in self.options() if f.default is not MISSING)

    def infotext_fields(self) -> list[str]:
        """``name: value`` for every option, as the PNG ``parameters`` text lists them."""
        return [f"{self.qualified(f.name)}: {getattr(self, f.name)}" for f in self.options()]


@dataclass(frozen=True)
class NoSettings(RuleSettings):
    """A rule without options beyond its scales."""


# ---------------------------------------------------------------- one step's predictions


@dataclass(frozen=True)
class StepContext:
    """Where a step is in the schedule: its index, the number of steps, ᾱ now and at the next step;
    the attention layout of the model it runs on (its family's, for rules that act in attention); which of the
    model's denoisers predicts at the step (``expert``: 0, or 1 for Wan 2.2's low-noise expert); the step's timestep
    as a number (``timestep``, from one host copy of the schedule: reading it waits for no device); and, at a denoiser
    call, what the group's :meth:`Rule.run_scope` yielded (``run_state``; None without one)."""

    step: int
    num_steps: int
    alpha_bar: float = 1.0
    alpha_bar_next: float = 1.0
    attention: AttentionLayout | None = None
    expert: int = 0
    run_state: Any = field(default=None, compare=False)
    timestep: float = 0.0


@dataclass(frozen=True)
class BranchPredictions:
    """The predictions one step evaluated, by branch name, each (B, C, H, W).

    ``active``: the terms inside their window at this step; ``terms``: every term's branch name in
    order (``positive``, ``positive_2`` …, ``negative``, ``negative_2`` …). A term outside its window
    is replaced by the empty prompt: :meth:`eps` then gives ε_∅. ``step`` counts denoiser calls,
    0 … ``num_steps`` − 1. ``attention``: the model's attention layout (its family's), whose ``patch``
    says how many latent cells per side make one image token, for rules that act per token.
    """

    predictions: Mapping[str, Tensor]
    active: frozenset[str]
    terms: tuple[str, ...]
    step: int = 0
    num_steps: int = 1
    attention: AttentionLayout | None = None

    def eps(self, name: str) -> Tensor:
        return self.predictions[name] if name in self.active else self.predictions[UNCONDITIONAL]

    @property
    def unconditional(self) -> Tensor:
        return self.predictions[UNCONDITIONAL]

    @property
    def negatives(self) -> list[str]:
        """Every negative branch name, active or not, in order."""
        return [n for n in self.terms if n.startswith("negative")]


# ---------------------------------------------------------------- the protocol


class Guidance(Protocol):
    """What a rule reads of the guidance it serves (``negprompt.guidance.plan.Guidance`` is one)."""

    rule: str
    scale: float  # s, or s⁺
    negatives: tuple[Any, ...]  # Terms, each with .prompt, .scale (None: the rule's default), .window
    extra_positives: tuple[Any, ...]
    settings: Any  # the rule's own Settings

    @property
    def terms(self) -> dict[str, Any]: ...  # every prompt branch by name

    def negative_scale(self, term: Any) -> float: ...  # s⁻ of a negative term


class Rule:
    """A guidance rule. Subclasses set ``name``, ``summary``, ``Settings`` and override :meth:`combine`.

    Defaults: one positive prompt only, every step needs ε_∅, no state, nothing to prepare.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help, naming the equation or paper
    Settings: ClassVar[type[RuleSettings]] = NoSettings
    listing_order: ClassVar[int] = 1000  # where --help and the web page list a built-in rule (then by name)

    def check(self, guidance: Guidance) -> None:
        """Raises :class:`GuidanceError` for prompts and scales the rule cannot take."""
        if guidance.extra_positives:
            raise GuidanceError(f"several positive prompts need rule 'weighted', not {self.name!r}")

    def needs_unconditional(self, guidance: Guidance, active: frozenset[str]) -> bool:
        """Whether ε_∅ must be evaluated at a step whose active terms are ``active``."""
        return True

    # Why the rule is not exact on the velocity v = ε − x₀ of a flow-matching model (None: it is).
    # Rules linear in the branch predictions commute with the affine map between ε, x₀ and v at
    # fixed x_t, so they are exact on v; see docs/guidance.md.
    not_on_velocity: ClassVar[str | None] = None

    def check_attention(self, layout: AttentionLayout) -> None:
        """Raises :class:`GuidanceError` if the rule cannot act on a model whose attention layers are laid
        out as ``layout`` (its family's; checked before a run)."""

    def check_prediction(self, kind: str) -> None:
        """Raises :class:`GuidanceError` if the rule is not exact on predictions of ``kind`` ("flow": velocities)."""
        if kind == "flow" and self.not_on_velocity is not None:
            raise GuidanceError(
                f"rule {self.name!r} is not exact on the velocity predictions of a flow-matching model "
                f"({self.not_on_velocity}); choose one of the linear rules (cfg, sd, dual, weighted, perp-neg, "
                "cfg-zero-star, nag, vsf; rescale and intervals apply to them)"
            )

    def negatives_as_rows(self, guidance: Guidance) -> bool:
        """Whether active negatives are denoiser rows (every rule of CFG's family); rules that act inside
        attention (NAG, VSF) say no and get them as contexts in :meth:`prepare`."""
        return True

    def negatives_as_contexts(self, guidance: Guidance) -> bool:
        """Whether :meth:`prepare` is given the active negatives' conditioning even when they are not rows."""
        return False

    def new_state(self, guidance: Guidance, batch_size: int) -> dict[str, Tensor]:
        """State carried across steps (e.g. a posterior, a momentum), fresh for a run."""
        return {}

    def combine(self, guidance: Guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        """ε̂ (B, C, H, W) from the step's branch predictions; may update ``state``."""
        raise NotImplementedError

    def update_state(
        self,
        guidance: Guidance,
        state: dict[str, Tensor],
        predictions: Mapping[str, Tensor],
        guided: Tensor,
        context: StepContext,
    ) -> None:
        """Moves the state on after a step's combination."""

    def run_scope(
        self, guidance: Guidance, denoisers: Sequence[Any], layout: AttentionLayout
    ) -> contextlib.AbstractContextManager[Any]:
        """Entered once around a whole run for each group that uses the rule (after attention capture installed its
        observers), on every denoiser of the model (``denoisers``: one, or Wan 2.2's two experts) laid out as
        ``layout``: e.g. install attention processors that pass through until a call hands them its parameters, and
        restore them on exit (also after an error). What it yields is given to each of the group's calls of
        :meth:`prepare` as ``context.run_state``. Default: nothing (None).

        Several groups of one run (``Session.run_together``) each enter their rule's scope, so processors installed
        here must pass every call through that their own group's :meth:`prepare` has not handed parameters."""
        return contextlib.nullcontext()

    def prepare(
        self, guidance: Guidance, denoiser: Any, context: StepContext, conditioning: Mapping[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        """Entered around the step's denoiser call: hand the run's processors this call's parameters (or install
        processors, and restore them on exit).

        ``conditioning``: each branch evaluated at this step, by name → its denoiser inputs for the
        group's images (``encoder_hidden_states`` (B, L, D) and, if the family has them, ``added_cond_kwargs``).
        The call's rows come first, in row order (branch-major: rows b·B … (b + 1)·B hold the b-th
        branch for the B images), then the attention contexts (:meth:`negatives_as_contexts`), which
        are not rows.
        """
        return contextlib.nullcontext()


class NegativeAsBase(Rule):
    """Rules whose one negative takes the place of the empty prompt as the base (``sd``, ``apg``, …).

    One negative without a scale of its own; ε_∅ is evaluated only at steps where the negative (or
    the positive) is outside its window and ε_∅ stands in for it.
    """

    def check(self, guidance: Guidance) -> None:
        super().check(guidance)
        single_negative(guidance, self.name, own_scale=False)

    def needs_unconditional(self, guidance: Guidance, active: frozenset[str]) -> bool:
        return not ({"positive", "negative"} <= active)

    @staticmethod
    def base(branches: BranchPredictions) -> Tensor:
        """ε_ỹ of the negative (ε_∅ outside its window, or without a negative), (B, C, H, W)."""
        negatives = branches.negatives
        return branches.eps(negatives[0]) if negatives else branches.unconditional


def single_negative(guidance: Guidance, rule: str, own_scale: bool) -> None:
    """Checks for rules with at most one negative (and, unless ``own_scale``, no scale of its own)."""
    if len(guidance.negatives) > 1:
        raise GuidanceError(
            f"rule {rule!r} takes one negative prompt; use 'dual', 'weighted' or 'perp-neg' for several"
        )
    if not own_scale and guidance.negatives and guidance.negatives[0].scale is not None:
        raise GuidanceError(f"rule {rule!r} has one scale (s); a negative's own scale needs rule 'dual' or 'weighted'")


class NegativeInAttention(Rule):
    """Rules whose one negative acts inside the cross-attention layers of the positive branch (NAG, VSF).

    The negative is no denoiser row: :meth:`run_scope` installs processors once per run, and :meth:`prepare`
    hands them its context at each call. At
    scale s = 1 a step is one pass (the positive's rows only); at s ≠ 1 it is CFG around the guided
    positive, ε̂ = ε_∅ + s(ε_y′ − ε_∅), eq. (1), ε_∅ unchanged. Outside the negative's window the
    positive runs plain. Subclasses give :meth:`neutral` and :meth:`combine_in_attention`.
    """

    def check(self, guidance: Guidance) -> None:
        super().check(guidance)
        single_negative(guidance, self.name, own_scale=False)
        if not guidance.negatives:
            raise GuidanceError(f"rule {self.name!r} needs a negative prompt")

    def needs_unconditional(self, guidance: Guidance, active: frozenset[str]) -> bool:
        return guidance.scale != 1 or "positive" not in active

    def negatives_as_rows(self, guidance: Guidance) -> bool:
        return False

    def negatives_as_contexts(self, guidance: Guidance) -> bool:
        return True

    def combine(self, guidance: Guidance, branches: BranchPredictions, state: dict[str, Tensor]) -> Tensor:
        positive = branches.eps("positive")
        if guidance.scale == 1:
            return positive
        from negprompt.guidance import formulas

        return formulas.cfg(branches.unconditional, positive, guidance.scale)

    def check_attention(self, layout: AttentionLayout) -> None:
        if not layout.reads_text:
            raise GuidanceError(
                f"rule {self.name!r} acts in cross-attention layers, and this model's denoiser has none"
            )
        if not layout.changeable:
            raise GuidanceError(
                f"rule {self.name!r} acts inside attention, which negprompt cannot yet change on "
                f"{layout.family or 'this model'}; choose a rule on predictions (sd, cfg, dual, weighted, perp-neg)"
            )

    def neutral(self, settings: Any) -> bool:
        """Whether the settings leave the attention output unchanged (then nothing is installed)."""
        raise NotImplementedError

    def combine_in_attention(self, settings: Any, layout: AttentionLayout) -> Any:
        """What replaces softmax(qKᵀ/√d)V in the positive's rows (a
        :data:`negprompt.layers.attention.Combine`) on a model laid out as ``layout`` (its
        ``text_start_tokens`` lead the negative's keys)."""
        raise NotImplementedError

    def run_scope(
        self, guidance: Guidance, denoisers: Sequence[Any], layout: AttentionLayout
    ) -> contextlib.AbstractContextManager[Any]:
        """The processors installed once for the run on every denoiser
        (:func:`negprompt.guidance.attention_processors.negative_attention_run`); nothing for neutral settings."""
        if self.neutral(guidance.settings) or not guidance.negatives:
            return contextlib.nullcontext()
        from negprompt.guidance.attention_processors import negative_attention_run

        return negative_attention_run(denoisers, layout)

    def prepare(
        self, guidance: Guidance, denoiser: Any, context: StepContext, conditioning: Mapping[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        """Hands the run's processors (``context.run_state``; installed for this call where there is none) the
        positive's rows, the negative's inputs and the rule's combination; nothing on calls without both."""
        negative = next((name for name in conditioning if name.startswith("negative")), None)
        if negative is None or "positive" not in conditioning or self.neutral(guidance.settings):
            return contextlib.nullcontext()
        from negprompt.guidance.attention_processors import negative_in_attention

        assert context.attention is not None, "the sampling loop gives the family's attention layout"
        rows = [name for name in conditioning if not name.startswith("negative")]  # contexts come last
        count = conditioning["positive"]["encoder_hidden_states"].shape[0]
        first = rows.index("positive") * count
        combine = self.combine_in_attention(guidance.settings, context.attention)
        if context.run_state is not None:
            return context.run_state.call(
                denoiser, slice(first, first + count), conditioning[negative], combine, negative
            )
        return negative_in_attention(
            denoiser, context.attention, slice(first, first + count), conditioning[negative], combine, negative
        )
