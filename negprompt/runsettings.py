"""What a user asks of a run, before the model fills in its defaults: :class:`RunSettings`.

The command line, the web page, the analyses and the API describe a run as one ``RunSettings``;
:meth:`negprompt.session.Session.spec_from` turns it into a checked
:class:`~negprompt.runspec.RunSpec` on a loaded model (``Session.spec(prompt, negative, **fields)``
is the same with keywords). Variations of a run are ``dataclasses.replace(settings, …)``.

Light on purpose (nothing but the standard library at import): the command line builds one without
importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from negprompt.guidance.plan import Term
    from negprompt.guidance.rules.base import RuleSettings
    from negprompt.guidance.windows import Window

Pair = tuple[int, int]  # (height, width), or a crop corner (top, left)


@dataclass(frozen=True)
class RunSettings:
    """A run as asked for; None leaves a setting to the model's declaration (its ``negprompt.json``).

    Values are kept as given (lists or tuples alike) and checked when a session makes the run's
    :class:`~negprompt.runspec.RunSpec`, so each error names what was given.

    ``prompt``: one text, or one per image. ``negative``: one text, several, or
    :class:`~negprompt.guidance.plan.Term` objects. ``negative_scales``, ``negative_windows``,
    ``negative_2``: one for every negative, or one per negative (``START:END`` text or a Window).
    ``size``: a side (square) or (height, width); ``height``/``width`` alone keep the other side at
    the model's default. ``rule_settings``: the rule's options (its Settings dataclass or a mapping,
    e.g. ``{"strength": 3}`` for ``dng``). ``interval`` limits guidance to a window of steps;
    ``interval_sigma`` = (σ_lo, σ_hi) to the steps whose noise level σ lies in that range.

    SDXL only, named as in diffusers' ``StableDiffusionXLPipeline``: ``prompt_2``/``negative_2`` (the
    second text encoder's prompts; SD3 and FLUX take them too), the positive's micro-conditions
    ``original_size``, ``crops_coords_top_left``, ``target_size`` and the negatives' ``negative_…``
    ones. ``embedded_guidance``: the scale w a guidance-distilled model takes as an input.

    Video models (Wan): ``frames``, the frame count of each video (default the model's; images are 1 frame), and
    ``scale_2``, the guidance scale of a second expert's steps (Wan 2.2's low-noise transformer; default ``scale``).
    """

    prompt: str | Sequence[str] = ""
    negative: str | Sequence[str | Term] | None = None
    _: KW_ONLY
    negative_scales: Sequence[float | None] | None = None
    negative_windows: Sequence[Window | str | None] | None = None
    rule: str = "sd"
    scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    seeds: Sequence[int] = (0,)
    size: int | Pair | None = None
    height: int | None = None
    width: int | None = None
    positive_window: Window | str | None = None
    extra_positives: Sequence[Term] = ()
    eta: float = 0.0
    rescale: float = 0.0
    interval: Window | str | None = None
    interval_sigma: tuple[float, float] | None = None
    rule_settings: RuleSettings | Mapping[str, Any] | None = None
    prompt_2: str | Sequence[str] | None = None
    negative_2: str | Sequence[str | None] | None = None
    original_size: Pair | None = None
    crops_coords_top_left: Pair | None = None
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair | None = None
    negative_target_size: Pair | None = None
    embedded_guidance: float | None = None
    frames: int | None = None
    scale_2: float | None = None


__all__ = ["RunSettings"]
