"""The Edit tab's work: the delayed-negative edit with its change map and measures (``negprompt edit``),
and the start sweep (``negprompt edit-sweep``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from negprompt.analysis.edit import comparison_figure, run_edit, summarize
from negprompt.analysis.sweep import SweepSettings, check_sweep_settings, run_sweep, summarize_sweep, write_sweep
from negprompt.guidance.windows import Window
from negprompt.interfaces.web.handlers.jobs import PageJob
from negprompt.interfaces.web.handlers.values import count, optional_number, seeds_from, whole
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.runspec import SettingsError
from negprompt.session import Session


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
