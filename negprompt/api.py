"""The Python API: everything the CLI does, as functions returning images and data.

>>> from negprompt import generate
>>> result = generate("a red circle", negative="a hat", seeds=[0, 1])
>>> result.images[0].save("circle.png")

``generate`` takes the common case as keywords; :class:`GenerationSettings` holds every setting of
a run (it is what each PNG carries), and :func:`run` executes one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.rules.base import RuleSettings
from negprompt.guidance.windows import Window
from negprompt.models.components import Components
from negprompt.models.loading import BUNDLED_NAME, load_components, resolve_model_path
from negprompt.sampling.loop import Group, StepCallback, StepInfo, UNetCallHook, sample_groups
from negprompt.sampling.schedulers import make_scheduler
from negprompt.version import __version__

DEFAULTS_FILE = "negprompt.json"  # optional file in a model directory: default steps, scale, scheduler
FALLBACK_DEFAULTS = {"steps": 50, "scale": 7.5, "scheduler": "default"}


class SettingsError(NegpromptError):
    """Settings that cannot describe a run."""


@lru_cache(maxsize=4)
def _load_cached(path: str) -> Components:
    return load_components(path)


def load_model(model: str | Path | Components | None = None) -> Components:
    """Components for ``model``: already loaded ones, a path, a cached model id, or None (the bundled model)."""
    if isinstance(model, Components):
        return model
    components = _load_cached(str(resolve_model_path(model)))
    components.source = str(model or BUNDLED_NAME)
    return components


def model_defaults(components: Components) -> dict[str, Any]:
    """Default steps, scale and scheduler of a model (its ``negprompt.json``, else diffusers' defaults)."""
    defaults = dict(FALLBACK_DEFAULTS)
    try:
        path = resolve_model_path(components.source) / DEFAULTS_FILE
    except ValueError:
        return defaults
    if path.exists():
        defaults.update(json.loads(path.read_text()))
    return defaults


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting of a generation run; a PNG's metadata holds these plus the image's index."""

    guidance: Guidance
    model: str = BUNDLED_NAME
    scheduler: str = "default"
    steps: int = 50
    seeds: tuple[int, ...] = (0,)
    height: int = 512
    width: int = 512
    eta: float = 0.0

    def to_json(self) -> dict:
        return {
            "negprompt_version": __version__,
            "model": self.model,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "seeds": list(self.seeds),
            "height": self.height,
            "width": self.width,
            "eta": self.eta,
            "guidance": self.guidance.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "GenerationSettings":
        try:
            return cls(
                guidance=Guidance.from_json(data["guidance"]),
                model=data["model"],
                scheduler=data["scheduler"],
                steps=int(data["steps"]),
                seeds=tuple(int(s) for s in data["seeds"]),
                height=int(data["height"]),
                width=int(data["width"]),
                eta=float(data.get("eta", 0.0)),
            )
        except (KeyError, TypeError) as error:
            raise SettingsError(f"settings lack or mistype the field {error}") from None

    def infotext(self, index: int) -> str:
        """AUTOMATIC1111-style ``parameters`` text for image ``index`` of the batch."""
        g = self.guidance
        lines = [_as_text(g.positive.prompt, index)]
        for term in g.negatives:
            lines.append(f"Negative prompt: {_as_text(term.prompt, index)}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.scheduler}",
            f"CFG scale: {g.scale}",
            f"Seed: {self.seeds[index]}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model}",
            *g.infotext_fields(),
        ]
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _as_text(prompt: str | tuple[str, ...], index: int) -> str:
    return prompt if isinstance(prompt, str) else prompt[index]


@dataclass
class Generation:
    """Images of one run with the settings that made them; ``trace`` holds each step if asked."""

    settings: GenerationSettings
    pixels: np.ndarray  # (B, H, W, 3) float32 in [0, 1]
    trace: list[StepInfo] | None = None
    unet_batch_rows: int = 0
    num_steps: int = 0
    images: list[Image.Image] = field(init=False)

    def __post_init__(self) -> None:
        self.images = [Image.fromarray(to_uint8(p)) for p in self.pixels]


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (pixels * 255).round().astype(np.uint8)


def negative_terms(
    negatives: str | Sequence[str | Term] | None,
    scales: Sequence[float | None] | None = None,
    windows: Sequence[Window | str | None] | None = None,
) -> tuple[Term, ...]:
    """Terms from negative prompt texts with optional per-negative scales and windows."""
    if negatives is None:
        return ()
    items = [negatives] if isinstance(negatives, str) else list(negatives)
    count = len(items)

    def per_negative(values, what):
        if values is None:
            return [None] * count
        values = list(values)
        if len(values) != count:
            raise SettingsError(f"{len(values)} {what} given for {count} negative prompt(s); give one per negative")
        return values

    terms = []
    for item, scale, window in zip(
        items, per_negative(scales, "negative scales"), per_negative(windows, "negative windows")
    ):
        if isinstance(item, Term):
            terms.append(item)
            continue
        if isinstance(window, str):
            window = Window.parse(window)
        terms.append(Term(item, scale, window or Window()))
    return tuple(terms)


def make_settings(
    prompt: str | Sequence[str] = "",
    negative: str | Sequence[str | Term] | None = None,
    *,
    negative_scales: Sequence[float | None] | None = None,
    negative_windows: Sequence[Window | str | None] | None = None,
    rule: str = "sd",
    scale: float | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    seeds: Sequence[int] = (0,),
    size: int | tuple[int, int] | None = None,
    model: str | Path | Components | None = None,
    positive_window: Window | str | None = None,
    extra_positives: Sequence[Term] = (),
    eta: float = 0.0,
    rescale: float = 0.0,
    interval: Window | str | None = None,
    interval_sigma: tuple[float, float] | None = None,
    rule_settings: RuleSettings | Mapping[str, Any] | None = None,
) -> tuple[GenerationSettings, Components]:
    """Settings for a run, with the model's defaults filled in, and the loaded model.

    ``rule_settings``: the rule's options (its Settings dataclass or a mapping of option names, e.g.
    ``{"strength": 3}`` for ``dng``). ``interval`` limits guidance to a window of steps; ``interval_sigma`` = (σ_lo, σ_hi) to the
    steps whose noise level σ = √((1 − ᾱ)/ᾱ) lies in that range (converted to steps here).
    """
    components = load_model(model)
    defaults = model_defaults(components)
    if isinstance(positive_window, str):
        positive_window = Window.parse(positive_window)
    if isinstance(interval, str):
        interval = Window.parse(interval)
    scheduler = scheduler or defaults["scheduler"]
    steps = defaults["steps"] if steps is None else steps
    if interval_sigma is not None:
        if interval is not None:
            raise SettingsError("give the guidance interval as steps or as noise levels, not both")
        interval = interval_from_sigmas(interval_sigma, scheduler, steps, components)
    prompt_value = prompt if isinstance(prompt, str) else tuple(prompt)
    guidance = Guidance(
        rule=rule,
        positive=Term(prompt_value, None, positive_window or Window()),
        negatives=negative_terms(negative, negative_scales, negative_windows),
        scale=defaults["scale"] if scale is None else scale,
        extra_positives=tuple(extra_positives),
        rescale=rescale,
        interval=interval,
        settings=rule_settings,
    )
    if size is None:
        height = width = components.default_size
    elif isinstance(size, int):
        height = width = size
    else:
        height, width = size
    if isinstance(eta, bool) or not math.isfinite(eta):
        raise SettingsError(f"eta must be a finite number, got {eta!r}")
    settings = GenerationSettings(
        guidance=guidance,
        model=components.source,
        scheduler=scheduler,
        steps=steps,
        seeds=tuple(int(s) for s in seeds),
        height=height,
        width=width,
        eta=eta,
    )
    return settings, components


def interval_from_sigmas(sigmas: tuple[float, float], scheduler: str, steps: int, components: Components) -> Window:
    """The steps whose noise level σ lies in [σ_lo, σ_hi], as a window (σ falls step by step)."""
    low, high = sigmas
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise SettingsError(f"noise-level interval needs 0 ≤ σ_lo < σ_hi, got {low}:{high}")
    probe = make_scheduler(scheduler, components.scheduler)
    probe.set_timesteps(steps)
    alphas = probe.alphas_cumprod.double()
    inside = []
    for index, t in enumerate(probe.timesteps):
        a = float(np.interp(float(t), np.arange(len(alphas)), alphas.numpy()))
        if low <= math.sqrt((1 - a) / a) <= high:
            inside.append(index)
    if not inside:
        raise SettingsError(f"no step of this schedule has a noise level σ in [{low}, {high}]")
    return Window(inside[0], inside[-1] + 1)


def run(
    settings: GenerationSettings,
    components: Components | None = None,
    *,
    trace: bool = False,
    callback: StepCallback | None = None,
    unet_hooks: Sequence[UNetCallHook] = (),
    progress: bool = False,
) -> Generation:
    """Executes ``settings`` and returns the images (and the per-step trace if ``trace``)."""
    return run_together(
        [settings], components, trace=trace, callback=callback, unet_hooks=unet_hooks, progress=progress
    )[0]


def run_together(
    settings_list: Sequence[GenerationSettings],
    components: Components | None = None,
    *,
    trace: bool = False,
    callback: StepCallback | None = None,
    unet_hooks: Sequence[UNetCallHook] = (),
    progress: bool = False,
    max_rows_per_call: int | None = None,
) -> list[Generation]:
    """Runs several settings that differ only in guidance and seeds in ONE batched loop.

    Steps the runs have in common (same seeds, prompts and state, e.g. a delayed negative before its
    window opens) are computed once. Returns one Generation per settings, in order.
    """
    first = settings_list[0]
    shared = ("model", "scheduler", "steps", "height", "width", "eta")
    for other in settings_list[1:]:
        differing = [name for name in shared if getattr(other, name) != getattr(first, name)]
        if differing:
            raise SettingsError(f"runs batched together must share {', '.join(differing)}")
    components = components or load_model(first.model)
    output = sample_groups(
        components,
        [Group(s.guidance, s.seeds) for s in settings_list],
        make_scheduler(first.scheduler, components.scheduler),
        num_steps=first.steps,
        height=first.height,
        width=first.width,
        callback=callback,
        keep_trace=trace,
        unet_hooks=unet_hooks,
        progress=progress,
        eta=first.eta,
        max_rows_per_call=max_rows_per_call,
    )
    generations, start = [], 0
    for g, settings in enumerate(settings_list):
        count = len(settings.seeds)
        steps = None if output.trace is None else [info for info in output.trace if info.group == g]
        generations.append(
            Generation(
                settings=settings,
                pixels=output.images[start : start + count],
                trace=steps,
                unet_batch_rows=output.unet_batch_rows,
                num_steps=output.num_steps,
            )
        )
        start += count
    return generations


def generate(
    prompt: str | Sequence[str] = "",
    negative: str | Sequence[str | Term] | None = None,
    *,
    trace: bool = False,
    callback: StepCallback | None = None,
    progress: bool = False,
    **options: Any,
) -> Generation:
    """Generates one image per seed. Options are those of :func:`make_settings`."""
    settings, components = make_settings(prompt, negative, **options)
    return run(settings, components, trace=trace, callback=callback, progress=progress)


def with_seeds(settings: GenerationSettings, seeds: Sequence[int]) -> GenerationSettings:
    return replace(settings, seeds=tuple(seeds))
