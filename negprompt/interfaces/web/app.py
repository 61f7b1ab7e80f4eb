"""The page of ``negprompt serve``: its layout, queue and cancel buttons. The work is in
:mod:`negprompt.interfaces.web.handlers`; this module only turns the page's fields into their
requests and their results into the page's outputs.

Every button that runs the model goes through Gradio's queue under one concurrency id with a limit
of 1, and the handlers hold the session's lock: one job per loaded model at a time, the others wait
in line (the page says where). Light events (the rule's options, the schedule's sliders, the step
slider of a capture) skip the queue, so the page answers while a job runs. A job runs in a thread
of its own; its steps stream to the page (progress and the predicted clean image x̂₀), and Cancel
stops it at its next UNet call.
"""

from __future__ import annotations

import math
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from negprompt.guidance.rules import all_rules
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    AttentionRequest,
    EditRequest,
    GenerateRequest,
    NegativeInput,
    PageJob,
    SweepRequest,
    error_message,
)
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.sampling.schedulers import SCHEDULER_NAMES
from negprompt.session import Session

MODEL_QUEUE = "model"  # the concurrency id of every event that runs the model
UPDATE_SECONDS = 0.2  # a job's progress and x̂₀ reach the page at most this often
CANCEL_WAIT_SECONDS = 10.0  # Cancel answers once the job stopped (at its next UNet call), or after this
KEEP_JOB_FOLDERS = 64  # output folders of the latest jobs kept on disk (Gradio copies what it serves)
CSS = """
.pixelated img { image-rendering: pixelated; }
#generate-preview img, #attention-image img { width: 160px; height: 160px; object-fit: contain; }
"""


class JobFolders:
    """A folder per job under one temporary folder of the server; the oldest beyond ``keep`` are removed."""

    def __init__(self, keep: int = KEEP_JOB_FOLDERS) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="negprompt-serve-"))
        self.keep = keep
        self._lock = threading.Lock()

    def new(self) -> Path:
        with self._lock:
            folder = Path(tempfile.mkdtemp(dir=self.root))
            folders = sorted(self.root.iterdir(), key=lambda path: path.stat().st_mtime)
            for old in folders[: max(0, len(folders) - self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
            return folder

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class PageJobs:
    """The job each page (browser session) has running or waiting, so that its Cancel button reaches it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, PageJob] = {}

    def start(self, page: str, job: PageJob) -> None:
        with self._lock:
            self._jobs[page] = job

    def cancel(self, page: str, wait: float = CANCEL_WAIT_SECONDS) -> bool:
        """Cancels the page's job and waits (at most ``wait`` s) until it has stopped: its last report is
        then on the page before the word "cancelled"."""
        with self._lock:
            job = self._jobs.get(page)
        if job is None:
            return False
        job.cancel()
        job.finished.wait(wait)
        return True

    def finish(self, page: str, job: PageJob) -> None:
        with self._lock:
            if self._jobs.get(page) is job:
                del self._jobs[page]


def stream(work: Callable[[PageJob], Any], job: PageJob, interval: float = UPDATE_SECONDS) -> Iterator[tuple[str, Any]]:
    """Runs ``work(job)`` in a thread of its own and yields ``("progress", (done, total, preview))`` at
    most every ``interval`` seconds (the newest report, with the newest preview), then ``("done",
    result)`` or ``("error", one line)``. Closing the iterator early (the page went away) cancels the job."""
    updates: queue.SimpleQueue = queue.SimpleQueue()
    job.on_progress = lambda done, total, preview: updates.put(("progress", (done, total, preview)))

    def run() -> None:
        try:
            updates.put(("done", work(job)))
        except BaseException as error:  # every failure becomes the page's one line
            updates.put(("error", error_message(error)))
        finally:
            job.finished.set()

    thread = threading.Thread(target=run, name="negprompt-job", daemon=True)
    thread.start()
    pending, preview, last = None, None, -math.inf
    try:
        while True:
            wait = None if pending is None else max(0.0, last + interval - time.monotonic())
            try:
                kind, value = updates.get(timeout=wait)
            except queue.Empty:  # the interval has passed: show what is pending
                if job.stop.is_set():
                    pending = None
                    continue
                yield "progress", (*pending, preview)
                pending, preview, last = None, None, time.monotonic()
                continue
            if kind == "progress":
                if job.stop.is_set():
                    continue  # cancelled: no more steps on the page
                pending = value[:2]
                preview = value[2] if value[2] is not None else preview
                if time.monotonic() - last >= interval:
                    yield "progress", (*pending, preview)
                    pending, preview, last = None, None, time.monotonic()
                continue
            yield kind, value
            return
    finally:
        if thread.is_alive():
            job.cancel()


class JobPanel:
    """A tab's run and cancel buttons, its status line (the job's place in the queue, its step, its one
    line at the end) and its progress bar."""

    def __init__(self, tab: str, label: str) -> None:
        with gr.Row():
            self.run = gr.Button(label, variant="primary", elem_id=f"{tab}-run")
            self.cancel = gr.Button("Cancel", elem_id=f"{tab}-cancel")
        self.status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id=f"{tab}-status")
        self.bar = gr.HTML(progress_bar(0, 1), elem_id=f"{tab}-progress")

    def follow(
        self,
        jobs: PageJobs,
        page: str,
        job: PageJob,
        work: Callable[[PageJob], Any],
        show: Callable[[Any], dict],
        unit: str = "step",
        preview: Any = None,
    ) -> Iterator[dict]:
        """Runs ``work`` as ``page``'s job and streams it: status and bar per report (and the x̂₀ preview
        into ``preview``), then ``show(result)`` or the one-line error."""
        jobs.start(page, job)
        try:
            yield {self.status: "running", self.bar: progress_bar(0, None)}
            for kind, value in stream(work, job):
                if kind == "progress":
                    done, total, image = value
                    update = {
                        self.status: f"{unit} {done}" + (f" of {total}" if total else ""),
                        self.bar: progress_bar(done, total),
                    }
                    if preview is not None and image is not None:
                        update[preview] = image
                    yield update
                elif kind == "error":
                    yield {self.status: value, self.bar: progress_bar(0, 1)}
                else:
                    yield {self.bar: progress_bar(1, 1), **show(value)}
        finally:
            jobs.finish(page, job)

    def outputs(self, *others: Any) -> set:
        return {self.status, self.bar, *others}


def progress_bar(done: int, total: int | None) -> str:
    """An HTML progress bar; without a total, one that shows work going on."""
    if total:
        return f'<progress value="{min(done, total)}" max="{total}" style="width: 100%"></progress>'
    return '<progress style="width: 100%"></progress>'


def schedule_range(session: Session, scheduler: str | None, steps: Any) -> int:
    """UNet calls of a schedule (the range of the window sliders); the model's default on bad input."""
    try:
        return handlers.schedule_length(session, scheduler, steps)
    except Exception:  # a bad step count is reported when the run is asked for, not while typing
        return handlers.schedule_length(session, None, None)


def limits_text(limits: ServerLimits) -> str:
    return "\n".join(
        f"- {what}: {getattr(limits, name)} (`{ServerLimits.flag(name)}`)"
        for name, what, _, _ in ServerLimits.described()
    )


def build_app(session: Session, limits: ServerLimits, folders: JobFolders) -> gr.Blocks:
    """The page: Generate, Attention and Edit tabs over ``session``'s model."""
    defaults = session.defaults
    side = session.components.default_size
    multiple = session.components.size_multiple
    calls = handlers.schedule_length(session, None, None)
    rules = all_rules()
    jobs = PageJobs()
    family = session.components.family
    with gr.Blocks(title="negprompt", analytics_enabled=False, delete_cache=(3600, 7200)) as page:
        gr.Markdown(
            f"## negprompt — {session.model}\n{family.description}; {session.device}, {session.dtype}; "
            f"by default {defaults['scheduler']}, {defaults['steps']} steps, scale {defaults['scale']}, {side} px. "
            "One job runs on the model at a time; others wait in line."
        )
        with gr.Accordion("Limits of a request (negprompt serve --max-…)", open=False):
            gr.Markdown(limits_text(limits))
        panels: list[JobPanel] = []
        model_events: list[Any] = []
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                events, panel = generate_tab(session, limits, folders, jobs, rules, calls, side, multiple)
                model_events += events
                panels.append(panel)
            with gr.Tab("Attention", id="attention"):
                events, panel = attention_tab(session, limits, folders, jobs, rules)
                model_events += events
                panels.append(panel)
            with gr.Tab("Edit", id="edit"):
                events, panel = edit_tab(session, limits, folders, jobs, calls)
                model_events += events
                panels.append(panel)

        def on_cancel(request: gr.Request) -> str:
            return "cancelled" if jobs.cancel(request.session_hash) else "nothing to cancel"

        for panel in panels:
            panel.cancel.click(on_cancel, None, panel.status, queue=False, cancels=model_events, api_name=False)
        # A queued no-op when a page opens: the server's first queued event costs about 0.6 s of set-up,
        # paid here instead of after the visitor's first click.
        page.load(lambda: None, None, None, concurrency_id="page-load", concurrency_limit=None, api_name=False)
    return page


def model_event(panel: JobPanel, fn: Callable, inputs: Any, outputs: Any, name: str, button: Any = None) -> Any:
    """An event that runs the model: queued, one at a time per loaded model; its place in the queue shows
    on the panel's status line (the other outputs stay visible: x̂₀ updates under no veil)."""
    return (button or panel.run).click(
        fn,
        inputs,
        outputs,
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
        api_name=name,
        show_progress_on=panel.status,
    )


# ---------------------------------------------------------------- Generate


def generate_tab(
    session: Session,
    limits: ServerLimits,
    folders: JobFolders,
    jobs: PageJobs,
    rules: dict,
    calls: int,
    side: int,
    multiple: int,
) -> tuple[list[Any], JobPanel]:
    defaults = session.defaults
    with gr.Row():
        with gr.Column(scale=1):
            example, example_negative = handlers.example_pair(session)
            prompt = gr.Textbox(label="Prompt", value=example, elem_id="generate-prompt")
            negatives = [negative_fields(0, calls, example_negative)]
            if limits.negatives > 1:
                with gr.Accordion(f"Negatives 2–{limits.negatives}", open=False):
                    negatives += [negative_fields(index, calls) for index in range(1, limits.negatives)]
            with gr.Row():
                rule = gr.Dropdown(list(rules), value="sd", label="Rule", elem_id="generate-rule")
                scheduler = gr.Dropdown(
                    list(SCHEDULER_NAMES), value=defaults["scheduler"], label="Scheduler", elem_id="generate-scheduler"
                )
            option_groups, option_fields = rule_option_fields(rules, "sd")
            with gr.Row():
                scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="generate-scale")
                steps = gr.Number(
                    label=f"Steps (1–{limits.steps})", value=defaults["steps"], precision=0, elem_id="generate-steps"
                )
                rescale = gr.Slider(0, 1, value=0, step=0.05, label="Guidance rescale φ", elem_id="generate-rescale")
            with gr.Row():
                seed = gr.Number(label="Seed (first)", value=0, precision=0, elem_id="generate-seed")
                images = gr.Number(
                    label=f"Images (1–{limits.images}: seeds from the first)",
                    value=1,
                    precision=0,
                    elem_id="generate-images-count",
                )
                width = gr.Number(
                    label=f"Width (multiple of {multiple})", value=side, precision=0, elem_id="generate-width"
                )
                height = gr.Number(
                    label=f"Height (multiple of {multiple})", value=side, precision=0, elem_id="generate-height"
                )
            with gr.Row():
                compare = gr.Checkbox(
                    label="Side by side: no negative / negative / delayed negative (one batched run)",
                    value=False,
                    elem_id="generate-compare",
                )
                compare_start = gr.Slider(
                    0, calls - 1, value=calls // 4, step=1, label="delayed from step", elem_id="generate-compare-start"
                )
            panel = JobPanel("generate", "Generate")
        with gr.Column(scale=1):
            preview = gr.Image(
                label="x̂₀, the predicted clean image, at the latest step",
                format="png",
                interactive=False,
                height=192,
                elem_id="generate-preview",
                elem_classes="pixelated",
            )
            gallery = gr.Gallery(
                label="Images",
                columns=4,
                height="auto",
                object_fit="contain",
                preview=False,
                elem_id="generate-images",
                elem_classes="pixelated",
            )
            infotext = gr.Textbox(
                label="Infotext (PNG 'parameters')", lines=3, interactive=False, elem_id="generate-info"
            )
            files = gr.File(
                label="The PNGs, as negprompt generate writes them (negprompt generate --from-png FILE re-runs them)",
                file_count="multiple",
                interactive=False,
                elem_id="generate-files",
            )
            comparison = gr.Gallery(
                label="No negative / negative / delayed negative",
                columns=3,
                height="auto",
                object_fit="contain",
                preview=False,
                elem_id="generate-comparison",
                elem_classes="pixelated",
            )

    schedule = gr.State(calls)
    starts = [start for _, _, start, _ in negatives]
    ends = [end for _, _, _, end in negatives]

    def on_schedule(steps_value: Any, scheduler_value: str, old: int, *values: Any) -> list[Any]:
        new = schedule_range(session, scheduler_value, steps_value)
        end_values, delayed = values[: len(ends)], values[len(ends)]
        updates: list[Any] = [gr.update(maximum=new - 1) for _ in starts]
        updates += [gr.update(maximum=new, value=new if v >= old else min(v, new)) for v in end_values]
        return [*updates, gr.update(maximum=new - 1, value=min(delayed, new - 1)), new]

    for trigger in (steps.change, scheduler.change):
        trigger(
            on_schedule,
            [steps, scheduler, schedule, *ends, compare_start],
            [*starts, *ends, compare_start, schedule],
            queue=False,
            api_name=False,
        )
    rule.change(
        lambda chosen: [gr.update(visible=name == chosen) for name in option_groups],
        rule,
        list(option_groups.values()),
        queue=False,
        api_name=False,
    )

    fields = [prompt, rule, scale, steps, scheduler, seed, images, width, height, rescale, compare, compare_start]
    fields += [component for row in negatives for component in row] + [schedule]
    fields += [component for group in option_fields.values() for component in group.values()]

    def request_of(values: dict) -> GenerateRequest:
        end_of_schedule = values[schedule]
        chosen = values[rule]
        return GenerateRequest(
            prompt=values[prompt],
            negatives=tuple(
                NegativeInput(
                    values[text],
                    values[scale_field],
                    values[start],
                    None if values[end] >= end_of_schedule else values[end],
                )
                for text, scale_field, start, end in negatives
            ),
            rule=chosen,
            rule_options={name: values[field] for name, field in option_fields.get(chosen, {}).items()},
            scale=values[scale],
            steps=values[steps],
            scheduler=values[scheduler],
            seed=values[seed],
            images=values[images],
            width=values[width],
            height=values[height],
            rescale=values[rescale],
            compare=values[compare],
            compare_start=values[compare_start],
        )

    def on_generate(values: dict, request: gr.Request) -> Iterator[dict]:
        folder = folders.new()
        yield {gallery: None, files: None, infotext: "", comparison: None, preview: None}
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_seconds=UPDATE_SECONDS),
            lambda job: handlers.generate(session, request_of(values), limits, folder, job),
            lambda result: {
                panel.status: f"done: {len(result.pngs)} image(s) in {result.seconds:.2f} s",
                gallery: [(str(path), path.name) for path in result.pngs],
                files: [str(path) for path in result.pngs],
                infotext: result.infotext,
                comparison: [(str(path), caption) for path, caption in result.comparison] or None,
            },
            preview=preview,
        )

    outputs = panel.outputs(preview, gallery, infotext, files, comparison)
    return [model_event(panel, on_generate, set(fields), outputs, "generate")], panel


def negative_fields(index: int, calls: int, example: str = "") -> tuple[Any, Any, Any, Any]:
    """A negative prompt's text, its scale s⁻ and its step window [from, to) as two sliders on the schedule."""
    with gr.Group():
        text = gr.Textbox(
            label=f"Negative {index + 1}",
            value=example,
            placeholder="empty: not used",
            elem_id=f"generate-negative-{index}",
        )
        with gr.Row():
            scale = gr.Textbox(
                label="s⁻ (rules dual, weighted; empty: s − 1)", value="", elem_id=f"generate-negative-scale-{index}"
            )
            start = gr.Slider(
                0, calls - 1, value=0, step=1, label="from step", elem_id=f"generate-window-start-{index}"
            )
            end = gr.Slider(
                1,
                calls,
                value=calls,
                step=1,
                label="to step (right end: the last)",
                elem_id=f"generate-window-end-{index}",
            )
    return text, scale, start, end


def rule_option_fields(rules: dict, chosen: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A group of number fields per rule with options, generated from its Settings dataclass (label:
    the command-line flag and help; value: the default), visible while the rule is chosen."""
    groups, fields = {}, {}
    for rule in rules.values():
        options = rule.Settings.options()
        if not options:
            continue
        with gr.Group(visible=rule.name == chosen) as group:
            gr.Markdown(f"Options of rule **{rule.name}**: {rule.summary}")
            with gr.Row():
                fields[rule.name] = {
                    option.name: gr.Number(
                        label=f"{rule.Settings.flag(option)}: {option.metadata['help']}"
                        + (f" ({option.metadata['unit']})" if option.metadata.get("unit") else ""),
                        value=option.default,
                        precision=0 if rule.Settings.kind(option) is int else None,
                        elem_id=f"option-{rule.name}-{option.name}",
                    )
                    for option in options
                }
        groups[rule.name] = group
    return groups, fields


# ---------------------------------------------------------------- Attention


def attention_tab(
    session: Session, limits: ServerLimits, folders: JobFolders, jobs: PageJobs, rules: dict
) -> tuple[list[Any], JobPanel]:
    defaults = session.defaults
    with gr.Row():
        with gr.Column(scale=1):
            example, example_negative = handlers.example_pair(session)
            prompt = gr.Textbox(
                label="Prompt", value=f"{example} with a sun" if example else "", elem_id="attention-prompt"
            )
            negative = gr.Textbox(label="Negative", value=example_negative, elem_id="attention-negative")
            words = gr.Textbox(
                label=f"Positive words to map, comma-separated (empty: all; at most {limits.words})",
                elem_id="attention-words",
            )
            negative_words = gr.Textbox(label="Negative words to map (empty: all)", elem_id="attention-negative-words")
            with gr.Row():
                rule = gr.Dropdown(list(rules), value="sd", label="Rule", elem_id="attention-rule")
                scheduler = gr.Dropdown(
                    list(SCHEDULER_NAMES), value=defaults["scheduler"], label="Scheduler", elem_id="attention-scheduler"
                )
            with gr.Row():
                scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="attention-scale")
                steps = gr.Number(
                    label=f"Steps (1–{limits.steps})", value=defaults["steps"], precision=0, elem_id="attention-steps"
                )
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="attention-seed")
                columns = gr.Slider(2, 20, value=10, step=1, label="Steps in the timeline", elem_id="attention-columns")
            panel = JobPanel("attention", "Capture attention")
            image = gr.Image(
                label="Image",
                format="png",
                interactive=False,
                height=160,
                elem_id="attention-image",
                elem_classes="pixelated",
            )
        with gr.Column(scale=2):
            figure = gr.Image(
                label="Heat-map timeline (rows: words of the positive, then the negative branch)",
                format="png",
                interactive=False,
                elem_id="attention-timeline",
            )
            with gr.Row():
                with gr.Column(scale=1):
                    step = gr.Slider(0, 1, value=0, step=1, label="Step", elem_id="attention-step")
                    step_figure = gr.Image(
                        label="The maps at this step", format="png", interactive=False, elem_id="attention-step-view"
                    )
                with gr.Column(scale=2):
                    word = gr.Dropdown([], label="Negative word of the r_t curve", elem_id="attention-rt-word")
                    curve = gr.Image(
                        label="r_t: the negative word's strength",
                        format="png",
                        interactive=False,
                        elem_id="attention-rt",
                    )
                    related = gr.Markdown(elem_id="attention-related")
    captured = gr.State(None)

    def on_capture(values: dict, request: gr.Request) -> Iterator[dict]:
        folder = folders.new()
        asked = AttentionRequest(
            prompt=values[prompt],
            negative=values[negative],
            words=values[words],
            negative_words=values[negative_words],
            rule=values[rule],
            scale=values[scale],
            steps=values[steps],
            scheduler=values[scheduler],
            seed=values[seed],
            columns=values[columns],
        )

        def show(result: handlers.AttentionResult) -> dict:
            first = handlers.content_word(result.negative_words)
            try:
                rt, note = handlers.strength_view(result.capture, first)
            except Exception as error:  # e.g. no content word captured on the positive branch
                rt, note = None, error_message(error)
            kept = result.steps
            return {
                panel.status: f"captured {len(kept)} steps",
                image: str(result.png),
                figure: result.timeline,
                step: gr.update(minimum=kept[0], maximum=kept[-1], value=kept[-1]),
                step_figure: handlers.step_view(session, result.capture, kept[-1]),
                word: gr.update(choices=result.negative_words, value=first),
                curve: rt,
                related: note,
                captured: result.capture,
            }

        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_every=0),
            lambda job: handlers.attend(session, asked, limits, folder, job),
            show,
        )

    fields = {prompt, negative, words, negative_words, rule, scale, steps, scheduler, seed, columns}
    outputs = panel.outputs(image, figure, step, step_figure, word, curve, related, captured)
    event = model_event(panel, on_capture, fields, outputs, "attention")

    def on_step(chosen: Any, result: Any) -> Any:
        if result is None:
            return None
        return handlers.step_view(session, result, chosen)

    def on_word(chosen: str, result: Any) -> tuple[Any, str]:
        if result is None or not chosen:
            return None, ""
        try:
            return handlers.strength_view(result, chosen)
        except Exception as error:
            return None, error_message(error)

    step.change(on_step, [step, captured], step_figure, queue=False, api_name=False)
    word.change(on_word, [word, captured], [curve, related], queue=False, api_name=False)
    return [event], panel


# ---------------------------------------------------------------- Edit


def edit_tab(
    session: Session, limits: ServerLimits, folders: JobFolders, jobs: PageJobs, calls: int
) -> tuple[list[Any], JobPanel]:
    defaults = session.defaults
    with gr.Row():
        with gr.Column(scale=1):
            example, example_negative = handlers.example_pair(session)
            prompt = gr.Textbox(label="Prompt", value=example, elem_id="edit-prompt")
            negative = gr.Textbox(label="Negative", value=example_negative, elem_id="edit-negative")
            start = gr.Slider(
                0, calls - 1, value=calls // 4, step=1, label="The negative from step", elem_id="edit-start"
            )
            with gr.Row():
                scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="edit-scale")
                steps = gr.Number(
                    label=f"Steps (1–{limits.steps})", value=defaults["steps"], precision=0, elem_id="edit-steps"
                )
                seed = gr.Number(label="Seed (first)", value=0, precision=0, elem_id="edit-seed")
                images = gr.Number(label=f"Images (1–{limits.images})", value=2, precision=0, elem_id="edit-images")
            with gr.Row():
                region = gr.Dropdown(
                    ["auto", "attention", "detector"], value="auto", label="Region", elem_id="edit-region"
                )
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Attention-mask threshold")
            panel = JobPanel("edit", "Edit")
            gr.Markdown(
                "**Start sweep**: the negative switched on at every k-th step, scored by the model's region finder."
            )
            with gr.Row():
                every = gr.Slider(1, 10, value=4, step=1, label="Start every k steps", elem_id="sweep-every")
                sweep_images = gr.Number(
                    label=f"Images (1–{limits.sweep_images})", value=4, precision=0, elem_id="sweep-images"
                )
            sweep_run = gr.Button("Sweep the start", elem_id="sweep-run")
        with gr.Column(scale=2):
            figure = gr.Image(
                label="No negative / negative at every step / delayed negative, the change maps and the region",
                format="png",
                interactive=False,
                elem_id="edit-figure",
            )
            table = gr.Markdown(elem_id="edit-table")
            sweep_figure = gr.Image(
                label="Start sweep: removal against locality", format="png", interactive=False, elem_id="sweep-figure"
            )
            sweep_table = gr.Markdown(elem_id="sweep-table")

    def on_schedule(steps_value: Any, current: Any) -> Any:
        new = schedule_range(session, None, steps_value)
        return gr.update(maximum=new - 1, value=min(current, new - 1))

    steps.change(on_schedule, [steps, start], start, queue=False, api_name=False)

    def on_edit(values: dict, request: gr.Request) -> Iterator[dict]:
        asked = EditRequest(
            prompt=values[prompt],
            negative=values[negative],
            start=values[start],
            seed=values[seed],
            images=values[images],
            steps=values[steps],
            scale=values[scale],
            region=values[region],
            threshold=values[threshold],
        )
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_every=0),
            lambda job: handlers.edit(session, asked, limits, job),
            lambda result: {panel.status: "done", figure: result.figure, table: result.table},
            unit="UNet call",
        )

    def on_sweep(values: dict, request: gr.Request) -> Iterator[dict]:
        asked = SweepRequest(
            prompt=values[prompt],
            negative=values[negative],
            every=values[every],
            seed=values[seed],
            images=values[sweep_images],
            steps=values[steps],
            scale=values[scale],
        )
        folder = folders.new()
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_every=0),
            lambda job: handlers.sweep(session, asked, limits, folder, job),
            lambda result: {panel.status: "done", sweep_figure: str(result.figure), sweep_table: result.table},
            unit="UNet call",
        )

    edit_fields = {prompt, negative, start, seed, images, steps, scale, region, threshold}
    sweep_fields = {prompt, negative, every, seed, sweep_images, steps, scale}
    events = [
        model_event(panel, on_edit, edit_fields, panel.outputs(figure, table), "edit"),
        model_event(panel, on_sweep, sweep_fields, panel.outputs(sweep_figure, sweep_table), "sweep", sweep_run),
    ]
    return events, panel


# ---------------------------------------------------------------- serving


def stop_on_terminate(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl+C: Gradio closes the server and the job folders are removed."""
    raise KeyboardInterrupt


def serve(session: Session, host: str, port: int, limits: ServerLimits) -> None:
    """Serves the page on ``host``:``port`` until interrupted (Ctrl+C)."""
    folders = JobFolders()
    handlers.warm_up(session, folders.new())
    page = build_app(session, limits, folders)
    page.queue(max_size=limits.queue, default_concurrency_limit=1)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    print(f"negprompt serve: http://{host}:{port} ({session.model} on {session.device}; Ctrl+C stops)", flush=True)
    if threading.current_thread() is threading.main_thread():  # a service manager's stop ends it as Ctrl+C does
        signal.signal(signal.SIGTERM, stop_on_terminate)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            quiet=True,
            show_error=False,
            allowed_paths=[str(folders.root)],
            footer_links=["api"],
            ssr_mode=False,
            mcp_server=False,
            theme=theme,
            css=CSS,
        )
    finally:
        folders.remove()
