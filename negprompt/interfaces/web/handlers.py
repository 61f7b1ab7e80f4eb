"""The work behind each button of ``negprompt serve``, as plain functions: plain values in, images, files
and text out. The page (``app.py``) only lays them out; the tests call them directly.

Every function that runs the model takes a :class:`PageJob` (one visitor's request) and through it
holds the session's lock for the whole job (one job per loaded model at a time), reports progress,
and stops at the next UNet call once cancelled. Bad input raises a
:class:`~negprompt.errors.NegpromptError` whose first line is what the command line would print;
:func:`error_message` turns any exception into the page's one line.
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.analysis.edit import comparison_figure, run_edit, summarize
from negprompt.analysis.strength import FUNCTION_WORDS, strength_curves
from negprompt.analysis.sweep import SweepSettings, check_sweep_settings, run_sweep, summarize_sweep, write_sweep
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.figures import strength_figure, timeline
from negprompt.attention.result import AttentionCapture, capture
from negprompt.attention.tokens import tokenize_words
from negprompt.errors import NegpromptError, one_line
from negprompt.guidance.rules import rule_named
from negprompt.guidance.windows import Window
from negprompt.interfaces.options import seed_list
from negprompt.interfaces.png import save_generation
from negprompt.interfaces.web.settings import LimitError, ServerLimits
from negprompt.limits import MAX_SEED
from negprompt.runsettings import RunSettings
from negprompt.runspec import Generation, RunSpec, SettingsError, to_uint8
from negprompt.sampling.loop import StepInfo, decode
from negprompt.session import Session

LOG = logging.getLogger("negprompt.serve")
COMPARE_LABELS = ("no negative", "negative", "delayed negative")
CAPTURE_MEMORY_MB = 256.0  # what one Attention-tab capture may store


# ---------------------------------------------------------------- jobs


class Cancelled(NegpromptError):
    """The visitor cancelled the job."""


Progress = Callable[[int, "int | None", "Image.Image | None"], None]  # (done, in all or None, x̂₀ preview or None)


@dataclass
class PageJob:
    """How a job reports progress and is stopped.

    ``on_progress(done, total, preview)``: after each sampling step (through :meth:`step_callback`,
    with the predicted clean image x̂₀ of the first image every ``preview_every`` steps and at most
    every ``preview_seconds``), or after each UNet call for work whose steps are not reported (edit,
    sweep; ``total``: ``expected_calls`` when known). ``cancel()`` may be called from any thread.
    """

    on_progress: Progress | None = None
    preview_every: int = 1
    preview_seconds: float = 0.0  # and at least so long apart (decoding x̂₀ costs a VAE call on latent models)
    expected_calls: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # set by whoever runs the job
    unet_calls: int = 0

    def cancel(self) -> None:
        self.stop.set()

    def check(self) -> None:
        """Raises :class:`Cancelled` once the job was cancelled."""
        if self.stop.is_set():
            raise Cancelled("cancelled")

    @contextmanager
    def holding(self, session: Session, report_calls: bool = False) -> Iterator[None]:
        """Holds ``session`` (its lock: one job per loaded model at a time) and stops the job at its next
        UNet call after :meth:`cancel` (a forward pre-hook on the UNet, removed on exit); with
        ``report_calls`` each UNet call is reported as progress."""

        def before_unet(module: Any, args: Any) -> None:
            self.check()
            self.unet_calls += 1
            if report_calls and self.on_progress is not None:
                self.on_progress(self.unet_calls, self.expected_calls, None)

        with session.exclusive() as components:
            self.check()
            handle = components.denoiser.register_forward_pre_hook(before_unet)
            try:
                yield
            finally:
                handle.remove()

    def step_callback(self, session: Session, group: int) -> Callable[[StepInfo], None]:
        """A sampling-loop callback reporting the steps of ``group``, with x̂₀ previews."""
        last_preview = [-math.inf]

        def report(info: StepInfo) -> None:
            if self.on_progress is None or info.group != group:
                return
            done = info.step + 1
            preview = None
            due = info.step % self.preview_every == 0 if self.preview_every else False
            now = time.monotonic()
            if (due and now - last_preview[0] >= self.preview_seconds) or (
                self.preview_every and done == info.num_steps
            ):
                preview = preview_image(session, info)
                last_preview[0] = now
            self.on_progress(done, info.num_steps, preview)

        return report


def preview_image(session: Session, info: StepInfo) -> Image.Image:
    """The predicted clean image x̂₀ of the step's first image."""
    pixels = decode(session.components, info.denoised[:1].to(session.components.device))[0]
    return Image.fromarray(to_uint8(np.clip(pixels, 0.0, 1.0)))


def error_message(error: BaseException) -> str:
    """The one line the page shows for ``error``: the command line's ``negprompt: error: …`` for bad
    input, ``cancelled``, or ``negprompt: failed: …`` (the traceback goes to the server's log only)."""
    if isinstance(error, Cancelled):
        return "cancelled"
    if isinstance(error, NegpromptError):
        return f"negprompt: error: {one_line(error)}"
    if isinstance(error, OSError):
        return f"negprompt: failed: {error.strerror or one_line(error)}"
    LOG.error("request failed", exc_info=error)
    return f"negprompt: failed: {type(error).__name__} in the server (its log has the details)"


# ---------------------------------------------------------------- plain values


def whole(value: Any, label: str) -> int:
    """``value`` as an int; a float is accepted only when whole (sliders send 20.0)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise SettingsError(f"{label} must be a whole number, got {value!r}")
    return int(value)


def seeds_from(value: Any, images: int, label: str = "seed") -> list[int]:
    """``images`` seeds from the first, ``value``: the text of the page's seed field (parsed as
    ``negprompt generate --seed`` parses one seed: whole, 0–2⁶⁴−1; a number field would round seeds
    above 2⁵³) or an int from the API. Errors quote the value as given."""
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+-").isdigit():  # "0,1" and "0-7" too: the images field says how many
            raise SettingsError(
                f"{label} {text!r}: give one whole number, 0–{MAX_SEED}; the images take the seeds after it"
            )
        try:
            [first] = seed_list(text)
        except argparse.ArgumentTypeError as error:
            raise SettingsError(str(error)) from None
    elif isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{label} must be a whole number 0–{MAX_SEED}, got {value!r}")
    elif not 0 <= value <= MAX_SEED:
        raise SettingsError(f"{label} {value} is outside 0–{MAX_SEED} (a 64-bit generator seed)")
    else:
        first = value
    if first > MAX_SEED - images + 1:
        typed = text if isinstance(value, str) else value
        raise SettingsError(
            f"{label} {typed} leaves no room for {images} images (seeds {typed} and after; the largest seed is "
            f"{MAX_SEED}): give a {label} up to {MAX_SEED - images + 1}, or fewer images"
        )
    return list(range(first, first + images))


def count(value: Any, label: str) -> int:
    """``value`` as a whole number of 1 or more."""
    number = whole(value, label)
    if number < 1:
        raise SettingsError(f"{label} must be 1 or more, got {number}")
    return number


def optional_number(value: Any, label: str) -> float | None:
    """``value`` (a number or the text of one) as a float; None for an empty field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"{label} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{label} must be a number, got {value!r}")
    return float(value)


def example_pair(session: Session) -> tuple[str, str]:
    """The first (prompt, negative) of the model's ``demo_pairs`` (its negprompt.json), else empty texts."""
    declared = session.components.declarations.demo_pairs
    return declared[0] if declared else ("", "")


def content_word(words: Sequence[str]) -> str:
    """The first word that names something (not "a", "with", …), else the first word."""
    return next((word for word in words if word not in FUNCTION_WORDS), words[0])


def word_list(text: str) -> list[str]:
    """Comma-separated words; empty items dropped."""
    return [word.strip() for word in (text or "").split(",") if word.strip()]


# ---------------------------------------------------------------- generate


@dataclass(frozen=True)
class NegativeInput:
    """One negative prompt: its text, its scale s⁻ (rules dual and weighted; None: s − 1) and its step
    window [start, end) (end None: to the last step)."""

    text: str
    scale: float | None = None
    start: int = 0
    end: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """The Generate tab's settings; None means the model's default, as on the command line."""

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


@dataclass
class GenerateResult:
    generation: Generation
    pngs: list[Path]  # the images as ``negprompt generate`` writes them (settings in their text chunks)
    infotext: str
    comparison: list[tuple[Path, str]]  # (PNG, caption): no negative / negative / delayed negative, per seed
    seconds: float


def schedule_length(session: Session, scheduler: str | None, steps: int | None) -> int:
    """UNet calls of the schedule: the range of the step-window sliders (steps count from 0)."""
    return session.denoiser_calls(scheduler or None, None if steps is None else whole(steps, "steps"))


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
    rule = rule_named(request.rule)
    kinds = {option.name: rule.Settings.kind(option) for option in rule.Settings.options()}
    options = {}
    for name, value in dict(request.rule_options).items():
        if value is None or value == "":
            continue  # an empty field: the option's default
        if name not in kinds:
            accepted = ", ".join(kinds) or "none"
            raise SettingsError(f"rule {request.rule!r} has no option {name!r}; its options: {accepted}")
        if kinds[name] is str:
            options[name] = str(value)
        else:
            options[name] = whole(value, name) if kinds[name] is int else optional_number(value, name)
    seeds = seeds_from(request.seed, images)
    return RunSettings(
        request.prompt or "",
        [n.text for n in negatives] or None,
        negative_scales=[optional_number(n.scale, "s⁻") for n in negatives] if negatives else None,
        negative_windows=[
            Window(whole(n.start, "window start"), None if n.end is None else whole(n.end, "window end"))
            for n in negatives
        ]
        or None,
        rule=request.rule,
        scale=optional_number(request.scale, "scale"),
        steps=steps,
        scheduler=request.scheduler or None,
        seeds=seeds,
        height=height,
        width=width,
        rescale=optional_number(request.rescale, "rescale") or 0.0,
        rule_settings=options or None,
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
    delayed = replace(settings, negative_windows=[Window(start) for _ in settings.negative])
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
    pngs = save_generation(generation, folder / "negprompt.png")
    infotext = "\n\n".join(generation.spec.infotext(i) for i in range(len(generation.spec.seeds)))
    comparison = []
    if len(generations) == 3:
        names = ("no-negative", "negative", "delayed-negative")
        paths = [save_generation(g, folder / f"{name}.png") for g, name in zip(generations, names)]
        for i, seed in enumerate(generation.spec.seeds):
            comparison += [(variant[i], f"{label}, seed {seed}") for variant, label in zip(paths, COMPARE_LABELS)]
    return GenerateResult(generation, pngs, infotext, comparison, seconds)


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
    request = GenerateRequest(prompt, (NegativeInput(negative or "blurry"),), steps=steps, width=side, height=side)
    generate(session, request, ServerLimits(), folder, PageJob(on_progress=lambda done, total, preview: None))


# ---------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionRequest:
    """The Attention tab's settings: one image; words comma-separated (empty: every word of the prompt)."""

    prompt: str
    negative: str
    words: str = ""
    negative_words: str = ""
    rule: str = "sd"
    scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int | str = 0  # the page sends the seed field's text
    columns: int = 10


@dataclass
class AttentionResult:
    capture: AttentionCapture
    png: Path
    timeline: Image.Image
    steps: list[int]  # the captured steps (the step slider's range)
    negative_words: list[str]


def attend(
    session: Session, request: AttentionRequest, limits: ServerLimits, folder: Path, job: PageJob
) -> AttentionResult:
    """Generates one image while capturing the chosen words' cross-attention maps on the positive and
    negative branches; the heat-map timeline as ``negprompt attend`` draws it."""
    if not (request.negative or "").strip():
        raise SettingsError("the attention maps of a negative need a negative prompt")
    columns = count(request.columns, "columns")
    generate_request = GenerateRequest(
        prompt=request.prompt,
        negatives=(NegativeInput(request.negative),),
        rule=request.rule,
        scale=request.scale,
        steps=request.steps,
        scheduler=request.scheduler,
        seed=request.seed,
    )
    spec = session.spec_from(run_settings(session, generate_request, limits))
    tokenizer = session.components.tokenizer
    words = {}
    for branch, given in (("positive", request.words), ("negative", request.negative_words)):
        chosen = word_list(given)
        if not chosen:
            prompt = spec.guidance.terms[branch].prompts_for(1)[0]
            chosen = list(dict.fromkeys(tokenize_words(tokenizer, prompt).words))
        limits.check("words", len(chosen), f"{branch} words:")
        words[branch] = chosen
    request_maps = CaptureRequest(words=words, memory_limit_mb=CAPTURE_MEMORY_MB)
    with job.holding(session):
        result = capture(
            spec, request_maps, session, trace=True, reducer=reduce_layer, callback=job.step_callback(session, 0)
        )
        figure = timeline(result, session.components, columns=columns)
    png = save_generation(result.generation, folder / "image.png")[0]
    return AttentionResult(result, png, figure, list(result.index["steps"]), words["negative"])


def step_view(session: Session, result: AttentionCapture, step: int) -> Image.Image:
    """The timeline at one captured step: each word's map over that step's x̂₀ (no lock: it reads the
    stored capture and decodes one latent)."""
    step = whole(step, "step")
    kept = result.index["steps"]
    if step not in kept:
        raise SettingsError(f"step {step} was not captured; captured steps: {kept[0]}–{kept[-1]}")
    return timeline(result, session.components, steps=[step])


def strength_view(result: AttentionCapture, negative_word: str) -> tuple[Image.Image, str]:
    """The r_t curve of ``negative_word`` (both definitions) and r(i), the positive word chosen for it."""
    curves = strength_curves(result, negative_word)
    related = curves["related"][0]
    figure = strength_figure(
        result.index["steps"],
        {"article, eq. (10)": curves["article"], "released code": curves["released"]},
        negative_word,
        related,
    )
    note = (
        f"r(i) = **{related}**: chosen automatically, the positive word whose maps are most like "
        f"those of **{negative_word}** over the steps where the negative acts"
    )
    return figure, note


# ---------------------------------------------------------------- edit and sweep


@dataclass(frozen=True)
class EditRequest:
    """The Edit tab's settings: the negative switched on at step ``start``; ``images`` seeds from ``seed``."""

    prompt: str
    negative: str
    start: int = 5
    seed: int | str = 0  # the page sends the seed field's text
    images: int = 2
    steps: int | None = None
    scheduler: str | None = None
    scale: float | None = None
    region: str = "auto"
    threshold: float = 0.5


@dataclass
class EditResult:
    figure: Image.Image
    summary: dict
    table: str  # Markdown: locality and removal, full negative against the delayed one


def edit(session: Session, request: EditRequest, limits: ServerLimits, job: PageJob) -> EditResult:
    """The delayed-negative edit (no negative / negative at every step / negative from ``start``) with
    its change map and measures, as ``negprompt edit`` computes them."""
    limits.check_text("the prompt", request.prompt or "")
    limits.check_text("the negative", request.negative or "")
    if not (request.negative or "").strip():
        raise SettingsError("an edit needs a negative prompt")
    steps = session.defaults["steps"] if request.steps is None else whole(request.steps, "steps")
    limits.check("steps", steps)
    images = count(request.images, "images")
    limits.check("images", images)
    seeds = seeds_from(request.seed, images)
    window = Window(whole(request.start, "window start"))
    session.check_schedule(request.scheduler or session.defaults["scheduler"], steps)
    calls = session.denoiser_calls(request.scheduler or None, steps)
    job.expected_calls = 3 * calls - window.resolve(calls)[0]  # the windowed run shares the plain one's first steps
    with job.holding(session, report_calls=True):
        outcome = run_edit(
            request.prompt or "",
            request.negative,
            window,
            seeds,
            threshold=0.5 if request.threshold is None else optional_number(request.threshold, "threshold"),
            region=request.region,
            model=session,
            steps=steps,
            scheduler=request.scheduler or None,
            scale=optional_number(request.scale, "scale"),
        )
    summary = summarize(outcome)
    return EditResult(comparison_figure(outcome), summary, edit_table(summary))


def edit_table(summary: Mapping[str, Any]) -> str:
    """The edit's means as a Markdown table: the negative at every step against the delayed one."""
    start, end = summary["window"]
    rows = [
        ("changed pixels", "changed_fraction", "{:.1%}"),
        ("changed pixels outside the region", "changed_outside_fraction", "{:.1%}"),
        ("SSIM outside the region", "ssim_outside", "{:.3f}"),
        ("PSNR outside the region (dB)", "psnr_outside", "{:.1f}"),
    ]
    lines = [
        f"Region of **{summary['word']}** from the {summary['region_source']}; {len(summary['seeds'])} image(s).",
        "",
        f"| measure | negative at every step | negative in steps [{start}, {end}) |",
        "|---|---:|---:|",
    ]
    for label, key, form in rows:
        lines.append(f"| {label} | {form.format(summary[f'full_{key}'])} | {form.format(summary[f'edited_{key}'])} |")
    if summary["region_source"] == "detector":
        lines.append(
            f"| {summary['word']} still there (no negative: {summary['present_original']:.0%}) | "
            f"{summary['present_full']:.0%} | {summary['present_edited']:.0%} |"
        )
    else:
        lines.append(
            f"| removal score (attention) | {summary['removal_score_full']:.2f} | {summary['removal_score_edited']:.2f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class SweepRequest:
    """The start sweep: the negative switched on at every ``every``-th step, over ``images`` seeds."""

    prompt: str
    negative: str
    every: int = 4
    seed: int | str = 0  # the page sends the seed field's text
    images: int = 4
    steps: int | None = None
    scheduler: str | None = None
    scale: float | None = None


@dataclass
class SweepResult:
    figure: Path  # removal against locality per start (``negprompt edit-sweep``'s sweep.png)
    table: str  # Markdown
    summary: dict


def sweep(session: Session, request: SweepRequest, limits: ServerLimits, folder: Path, job: PageJob) -> SweepResult:
    """The start sweep of one (prompt, negative) pair as ``negprompt edit-sweep`` runs it, scored by the
    model's region finder; its plot and table written into ``folder``."""
    limits.check_text("the prompt", request.prompt or "")
    limits.check_text("the negative", request.negative or "")
    if not (request.negative or "").strip():
        raise SettingsError("a start sweep needs a negative prompt")
    steps = session.defaults["steps"] if request.steps is None else whole(request.steps, "steps")
    limits.check("steps", steps)
    images = count(request.images, "images")
    limits.check("sweep_images", images, "images")
    every = count(request.every, "start every")
    seeds = seeds_from(request.seed, images)
    scheduler = request.scheduler or session.defaults["scheduler"]
    session.check_schedule(scheduler, steps)
    calls = session.denoiser_calls(scheduler, steps)
    settings = SweepSettings(
        pairs=((request.prompt or "", request.negative),),
        seeds=tuple(seeds),
        starts=tuple(range(0, calls, every)),
        early_ends=tuple(k for k in (3, 5) if k <= calls),
        steps=steps,
        scheduler=request.scheduler or None,
        scale=optional_number(request.scale, "scale"),
    )
    check_sweep_settings(settings, calls)
    with job.holding(session, report_calls=True):
        rows = run_sweep(settings, model=session, progress=False)
    summary = summarize_sweep(rows)
    paths = write_sweep(rows, summary, folder)
    lines = [line for line in paths[2].read_text().splitlines() if not line.startswith(("# ", "!["))]
    table = "\n".join(f"**{line[3:]}**" if line.startswith("## ") else line for line in lines)  # the page's titles
    return SweepResult(paths[3], table, summary)


__all__ = [
    "AttentionRequest",
    "Cancelled",
    "EditRequest",
    "GenerateRequest",
    "PageJob",
    "LimitError",
    "NegativeInput",
    "SweepRequest",
    "attend",
    "edit",
    "error_message",
    "generate",
    "schedule_length",
    "step_view",
    "strength_view",
    "sweep",
]
