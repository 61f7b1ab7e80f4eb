"""The Generate tab's work: a request's run (with the side-by-side comparison in one batched run), its PNGs
as ``negprompt generate`` writes them, and the server's warm-up."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from negprompt.guidance.economy import computed_rows
from negprompt.guidance.rules import rule_named
from negprompt.guidance.windows import AUTO, Window
from negprompt.interfaces.options import check_negative_economy
from negprompt.interfaces.png import save_generation
from negprompt.interfaces.video import container_for, save_video_generation, video_paths
from negprompt.interfaces.web.handlers.jobs import PageJob
from negprompt.interfaces.web.handlers.values import count, example_pair, optional_number, seeds_from, whole
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.runsettings import RunSettings
from negprompt.runspec import Generation, RunSpec, SettingsError
from negprompt.session import Session

COMPARE_LABELS = ("no negative", "negative", "delayed negative")


@dataclass(frozen=True)
class NegativeInput:
    """One negative prompt: its text, its scale s⁻ (rules dual and weighted; None: s − 1) and its step
    window [start, end): end None runs to the last step, ``"auto"`` until its effect has converged
    (``--negative-window START:auto``; rules sd and dual, docs/cheap-negatives.md)."""

    text: str
    scale: float | None = None
    start: int = 0
    end: int | str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """The Generate tab's settings; None means the model's default, as on the command line.

    ``negative_every``: each negative computed every K-th step of its window, its difference reused in
    between (``--negative-every K``; None or 1: every step). ``prompt_2`` and ``embedded_guidance`` are the
    options of the families that read them (a second text encoder's prompt: SDXL, SD3, FLUX; the guidance
    scale as an input: guidance-distilled FLUX); other families refuse them in one line.
    """

    prompt: str
    negatives: tuple[NegativeInput, ...] = ()
    rule: str = "sd"
    rule_options: Mapping[str, Any] = field(default_factory=dict)
    scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int | str = 0  # the page sends the seed field's text
    images: int = 1
    width: int | None = None
    height: int | None = None
    rescale: float = 0.0
    compare: bool = False  # also the image with no negative and with the negatives delayed, in one run
    compare_start: int | None = None  # the delayed negatives' first step (None: a quarter of the steps)
    negative_every: int | None = None
    prompt_2: str | None = None
    embedded_guidance: float | None = None
    frames: int | None = None  # frames of each video (video models; None: the model's default)


@dataclass
class GenerateResult:
    generation: Generation
    pngs: list[Path]  # the images as ``negprompt generate`` writes them (settings in their text chunks)
    infotext: str
    comparison: list[tuple[Path, str]]  # (PNG, caption): no negative / negative / delayed negative, per seed
    seconds: float
    negative_stops: str = ""  # where each auto-ended negative stopped, as the page shows it ("" without one)
    videos: list[Path] = field(default_factory=list)  # a video model's clips (MP4, or animated WebP); pngs: []


def schedule_length(session: Session, scheduler: str | None, steps: int | None) -> int:
    """UNet calls of the schedule: the range of the step-window sliders (steps count from 0)."""
    return session.denoiser_calls(scheduler or None, None if steps is None else whole(steps, "steps"))


def negative_period(value: Any) -> int:
    """K of "compute negatives every K steps" (None or an empty field: 1, every step), checked as the command
    line checks ``--negative-every``: a whole number ≥ 1."""
    number = optional_number(value, "negative every K")
    if number is None:
        return 1
    every = whole(number, "negative every K")
    if every < 1:
        raise SettingsError(f"negative every K {every}: a negative is evaluated every K steps, K ≥ 1 (1: every step)")
    return every


def window_end(value: Any) -> int | str | None:
    """A window's end as given: None (the last step), ``"auto"`` (any case) or a whole step index."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if not text.isdigit():
            raise SettingsError(f"window end {value!r}: give a step index (a whole number 1 or more) or auto")
        return int(text)
    return whole(value, "window end")


def negative_windows(request: GenerateRequest, negatives: Sequence[NegativeInput]) -> list[Window] | None:
    """Each negative's window [start, end) with the request's period K (None without negatives), checked as
    the command line checks ``--negative-window START:auto`` and ``--negative-every K`` (the same line for the
    same settings): an auto end or K > 1 needs a negative prompt and rule sd or dual; K = 1 is every step.
    Under sd at scale 1 (no negative branch) the session refuses them when it checks the run's guidance."""
    every = negative_period(request.negative_every)
    windows = [Window(whole(n.start, "window start"), window_end(n.end), every) for n in negatives]
    autos = [f"{window.start}:{AUTO}" for window in windows if window.is_auto]
    check_negative_economy(request.rule, len(negatives), every, autos)
    return windows or None


def rule_options(request: GenerateRequest) -> dict[str, Any]:
    """The rule's options from their fields (an empty field: the option's default), typed by its Settings."""
    rule = rule_named(request.rule)
    kinds = {option.name: rule.Settings.kind(option) for option in rule.Settings.options()}
    options = {}
    for name, value in dict(request.rule_options).items():
        if value is None or value == "":
            continue
        if name not in kinds:
            accepted = ", ".join(kinds) or "none"
            raise SettingsError(f"rule {request.rule!r} has no option {name!r}; its options: {accepted}")
        if kinds[name] is str:
            options[name] = str(value)
        else:
            options[name] = whole(value, name) if kinds[name] is int else optional_number(value, name)
    return options


def run_settings(session: Session, request: GenerateRequest, limits: ServerLimits) -> RunSettings:
    """The run the request describes, checked against ``limits`` (the rest is checked when the session
    makes its :class:`RunSpec`)."""
    limits.check_text("the prompt", request.prompt or "")
    negatives = [n for n in request.negatives if (n.text or "").strip()]
    limits.check("negatives", len(negatives), "negative prompts:")
    for index, negative in enumerate(negatives, start=1):
        limits.check_text(f"negative {index}", negative.text)
    steps = session.defaults["steps"] if request.steps is None else whole(request.steps, "steps")
    limits.check("steps", steps)
    images = count(request.images, "images")
    limits.check("images", images)
    side = session.components.default_size
    height = side if request.height is None else whole(request.height, "height")
    width = side if request.width is None else whole(request.width, "width")
    limits.check("side", height, "height")
    limits.check("side", width, "width")
    options = rule_options(request)
    windows = negative_windows(request, negatives)
    if request.prompt_2:
        limits.check_text("the second prompt", request.prompt_2)
    frames = None if request.frames is None else count(request.frames, "frames")
    limits.check("frames", session.defaults.get("frames", 1) if frames is None else frames)
    seeds = seeds_from(request.seed, images)
    return RunSettings(
        request.prompt or "",
        [n.text for n in negatives] or None,
        negative_scales=[optional_number(n.scale, "s⁻") for n in negatives] if negatives else None,
        negative_windows=windows,
        rule=request.rule,
        scale=optional_number(request.scale, "scale"),
        steps=steps,
        scheduler=request.scheduler or None,
        seeds=seeds,
        height=height,
        width=width,
        rescale=optional_number(request.rescale, "rescale") or 0.0,
        rule_settings=options or None,
        prompt_2=request.prompt_2 or None,
        embedded_guidance=optional_number(request.embedded_guidance, "embedded guidance"),
        frames=frames,
    )


def generate_specs(session: Session, request: GenerateRequest, limits: ServerLimits) -> list[RunSpec]:
    """The request's run; with ``compare``, first the same run with no negative (rule cfg) and last one
    with every negative switched on at ``compare_start``: three runs for one batched loop."""
    settings = run_settings(session, request, limits)
    spec = session.spec_from(settings)
    if not request.compare:
        return [spec]
    if not settings.negative:
        raise SettingsError("the side-by-side comparison needs a negative prompt")
    calls = session.denoiser_calls(spec.scheduler, spec.steps)
    start = calls // 4 if request.compare_start is None else whole(request.compare_start, "delayed start")
    plain = replace(
        settings, negative=None, negative_scales=None, negative_windows=None, rule="cfg", rule_settings=None
    )
    delayed = replace(  # each negative keeps its auto end and period
        settings,
        negative_windows=[Window(start, AUTO if w.is_auto else None, w.every) for w in settings.negative_windows],
    )
    return [session.spec_from(plain), spec, session.spec_from(delayed)]


def generate(
    session: Session, request: GenerateRequest, limits: ServerLimits, folder: Path, job: PageJob
) -> GenerateResult:
    """Runs the request (with ``compare``: no negative / negative / delayed negative in one batched run)
    and writes its PNGs into ``folder`` as ``negprompt generate`` writes them."""
    specs = generate_specs(session, request, limits)
    main = 1 if len(specs) == 3 else 0
    started = time.perf_counter()
    with job.holding(session):
        generations = session.run_together(specs, callback=job.step_callback(session, main))
    seconds = time.perf_counter() - started
    generation = generations[main]
    infotext = "\n\n".join(generation.spec.infotext(i) for i in range(len(generation.spec.seeds)))
    names = ("negprompt", "no-negative", "negative", "delayed-negative")
    written = [
        save_outputs(g, folder / name) for g, name in zip([generation, *generations[: len(specs) // 3 * 3]], names)
    ]
    comparison = []
    for i, seed in enumerate(generation.spec.seeds):
        comparison += [(variant[i], f"{label}, seed {seed}") for variant, label in zip(written[1:], COMPARE_LABELS)]
    pngs, videos = ([], written[0]) if generation.is_video else (written[0], [])
    return GenerateResult(generation, pngs, infotext, comparison, seconds, economy_note(generation), videos)


def save_outputs(generation: Generation, stem: Path) -> list[Path]:
    """The run's files as ``negprompt generate`` writes them: a PNG per image, or per video an MP4 (an animated
    WebP where no MP4 encoder is installed) with its frames and JSON beside it; the images' or clips' paths."""
    if not generation.is_video:
        return save_generation(generation, stem.with_suffix(".png"))
    container = container_for(stem.with_suffix(".png"))  # MP4 where an encoder is installed
    out = stem.with_suffix("." + container)
    save_video_generation(generation, out)
    return list(video_paths(out, generation.spec.seeds, container).clips)


def economy_note(generation: Generation) -> str:
    """Where the run's auto-ended negatives stopped (its record, ``Generation.negative_stops``) and the
    denoiser rows per image it computed against the rows of every negative at every step; "" when no
    negative asked for an auto end or a period (docs/cheap-negatives.md)."""
    guidance, steps = generation.spec.guidance, generation.num_steps
    economical = {name: term for name, term in guidance.terms.items() if term.window.economical}
    if not economical:
        return ""
    lines = []
    for name, stop in generation.negative_stops.items():
        number = 1 if name == "negative" else int(name.rsplit("_", 1)[1])
        window = economical[name].window
        start = window.resolve(steps)[0]
        said = f"negative {number} ({economical[name].prompt!r})"
        how = "computed" if window.every == 1 else f"computed every {window.every} steps"
        if stop is None:
            lines.append(f"{said}: auto end not reached, {how} to the last step ({steps} steps)")
        else:
            lines.append(
                f"{said}: auto end at step {stop} of {steps} ({how} in steps {start}–{stop - 1}, "
                "its last difference held after)"
            )
    planned = sum(len(guidance.branches_at(step, steps)) for step in range(steps))
    rows = computed_rows(guidance, steps, generation.negative_stops)
    lines.append(f"denoiser rows per image: {rows} of {planned} with every negative at every step")
    return "\n".join(lines)


def warm_up(session: Session, folder: Path) -> None:
    """One small run through :func:`generate` (the model's example prompts, two steps where its schedule
    allows so few, else its default; a small image), so that the first visitor does not pay for the
    first calls (on a GPU: kernel loading and set-up)."""
    prompt, negative = example_pair(session)
    side = min(session.components.default_size, 8 * session.components.size_multiple)
    try:
        session.check_schedule(session.defaults["scheduler"], 2)
        steps = 2
    except SettingsError:  # e.g. the bundled model: two steps would start at too high a noise level
        steps = None
    frames = 1 if session.components.family.makes_video else None  # a video model's shortest clip
    request = GenerateRequest(
        prompt, (NegativeInput(negative or "blurry"),), steps=steps, width=side, height=side, frames=frames
    )
    generate(session, request, ServerLimits(), folder, PageJob(on_progress=lambda done, total, preview: None))
