"""The page's jobs: one folder per job, each page's running job (for its Cancel button), a job's steps
streamed to the page from a thread of its own, a tab's run/cancel panel, and the events that run the model."""

from __future__ import annotations

import itertools
import math
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from negprompt.errors import NegpromptError
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    PageJob,
    error_message,
)

if TYPE_CHECKING:
    from negprompt.session import Session

MODEL_QUEUE = "model"  # the concurrency id of every event that runs the model
UPDATE_SECONDS = 0.2  # a job's progress and x̂₀ reach the page at most this often
WAITING_UPDATE_SECONDS = 1.0  # a waiting job's place in line is refreshed this often
CANCEL_WAIT_SECONDS = 10.0  # Cancel answers once the job stopped (at its next UNet call), or after this
KEEP_JOB_FOLDERS = 64  # output folders of the latest jobs kept on disk (Gradio copies what it serves)


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
    """The job each page (browser session) has running, and its place in line while it waits, so that
    its status line says where it stands and its Cancel button reaches it.

    A click first takes a ticket (:meth:`wait`, outside the queue), then its job joins Gradio's queue;
    the job gives the ticket back when it starts (:meth:`start`), or Cancel or leaving the page does.
    Places count the tickets taken before and the running job (a job started through the API without
    the page takes no ticket, so it is not counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, PageJob] = {}
        self._waiting: dict[str, tuple[int, str]] = {}  # page → (ticket, tab)
        self._tickets = itertools.count()

    def wait(self, page: str, tab: str) -> int:
        """Puts the page's next job in line (from ``tab``); returns how many jobs are ahead of it."""
        with self._lock:
            self._waiting[page] = (next(self._tickets), tab)
        return self.ahead(page) or 0

    def ahead(self, page: str, tab: str | None = None) -> int | None:
        """Jobs ahead of the page's waiting one (running and waiting); None when it waits for none (of ``tab``)."""
        with self._lock:
            mine = self._waiting.get(page)
            if mine is None or (tab is not None and mine[1] != tab):
                return None
            before = sum(ticket < mine[0] for ticket, _ in self._waiting.values())
            return before + len(self._jobs)

    def start(self, page: str, job: PageJob) -> None:
        with self._lock:
            self._waiting.pop(page, None)
            self._jobs[page] = job

    def cancel(self, page: str, wait: float = CANCEL_WAIT_SECONDS) -> str:
        """Cancels the page's job and waits (at most ``wait`` s) until it has stopped (its last report is
        then on the page before the word "cancelled"), or takes its waiting job out of line; what it did."""
        with self._lock:
            job = self._jobs.get(page)
            waited = self._waiting.pop(page, None)
        if job is None:
            return "cancelled before it started (it was waiting in line)" if waited else "nothing to cancel"
        job.cancel()
        job.finished.wait(wait)
        return "cancelled"

    def leave(self, page: str) -> None:
        """The page was closed: its waiting job leaves the line (Gradio drops its queued events)."""
        with self._lock:
            self._waiting.pop(page, None)

    def finish(self, page: str, job: PageJob) -> None:
        with self._lock:
            if self._jobs.get(page) is job:
                del self._jobs[page]


def waiting_text(ahead: int) -> str:
    """The status line of a job in line."""
    if ahead == 0:
        return "waiting: next in line"
    return f"waiting in line: {ahead} job{'s' if ahead > 1 else ''} ahead (one runs at a time)"


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

    def __init__(self, tab: str, label: str, jobs: PageJobs) -> None:
        self.tab, self.jobs = tab, jobs
        with gr.Row():
            self.run = gr.Button(label, variant="primary", elem_id=f"{tab}-run")
            self.cancel = gr.Button("Cancel", elem_id=f"{tab}-cancel")
        self.status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id=f"{tab}-status")
        self.bar = gr.HTML(progress_bar(0, 1), elem_id=f"{tab}-progress")
        # While the tab's job waits in line, its place is shown every second (then the timer stops itself).
        self.timer = gr.Timer(WAITING_UPDATE_SECONDS, active=False)
        self.timer.tick(self.on_tick, None, [self.status, self.timer], queue=False, api_name=False)

    def enqueue(self, request: gr.Request) -> tuple[str, Any]:
        """A click: the job takes its place in line (before it joins Gradio's queue) and says where it stands."""
        return waiting_text(self.jobs.wait(request.session_hash, self.tab)), gr.Timer(active=True)

    def not_started(self, request: gr.Request) -> Any:
        """The job's event failed: if it never started (Gradio turned it away: a full queue, a field it could
        not read), it leaves the line and the status says so; a job that ran or was cancelled keeps its line."""
        if self.jobs.ahead(request.session_hash, self.tab) is None:
            return gr.skip()
        self.jobs.leave(request.session_hash)
        return (
            "not started: the server turned the request away (a full queue: negprompt serve --max-queue; or a field "
            "out of its range, e.g. a window slider past a new step count: move it and click again)"
        )

    def on_tick(self, request: gr.Request) -> tuple[Any, Any]:
        ahead = self.jobs.ahead(request.session_hash, self.tab)
        if ahead is None:  # started, cancelled or gone: the job's own reports take over
            return gr.skip(), gr.Timer(active=False)
        return waiting_text(ahead), gr.skip()

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


def model_event(panel: JobPanel, fn: Callable, inputs: Any, outputs: Any, name: str, button: Any = None) -> Any:
    """An event that runs the model: the click takes a place in line (:meth:`JobPanel.enqueue`, answered
    at once), then the job joins the queue, one at a time per loaded model. The panel's status line
    says where it waits and how far it got; Gradio's own overlay (its estimate knows nothing of our
    jobs) is hidden, and the other outputs stay visible: x̂₀ updates under no veil."""
    clicked = (button or panel.run).click(
        panel.enqueue, None, [panel.status, panel.timer], queue=False, api_name=False, show_progress="hidden"
    )
    event = clicked.then(
        fn,
        inputs,
        outputs,
        concurrency_limit=1,
        concurrency_id=MODEL_QUEUE,
        api_name=name,
        show_progress="hidden",
    )
    event.failure(panel.not_started, None, panel.status, queue=False, api_name=False, show_progress="hidden")
    return event


def schedule_range(session: Session, scheduler: str | None, steps: Any) -> int:
    """UNet calls of a schedule (the range of the window sliders); the model's default on bad input."""
    try:
        return handlers.schedule_length(session, scheduler, steps)
    except Exception:  # a bad step count is reported when the run is asked for, not while typing
        return handlers.schedule_length(session, None, None)


def start_range(calls: int) -> int:
    """The largest value of a "from step" slider (0 to ``calls`` − 1) on a schedule of ``calls`` UNet calls.

    Gradio's sliders need minimum < maximum: on a schedule of one call the slider keeps the range
    0–1 and is made fixed (:func:`window_updates`)."""
    return max(calls - 1, 1)


def end_range(calls: int) -> int:
    """The largest value of a "to step" slider (1 to ``calls``), at least 2 (see :func:`start_range`)."""
    return max(calls, 2)


def window_updates(calls: int, old_calls: int, start: Any, end: Any) -> tuple[Any, Any]:
    """The two sliders of a step window moved onto a schedule of ``calls`` UNet calls (from ``old_calls``):
    an end at the old schedule's end stays at the end; values beyond the new range come back into it."""
    end = handlers.whole(end, "window end")
    new_end = calls if end >= old_calls else min(end, calls)
    return start_update(calls, start), gr.update(maximum=end_range(calls), value=new_end, interactive=calls > 1)


def start_update(calls: int, start: Any) -> Any:
    """A "from step" slider moved onto a schedule of ``calls`` UNet calls (its value kept within it)."""
    value = min(handlers.whole(start, "window start"), calls - 1)
    return gr.update(maximum=start_range(calls), value=value, interactive=calls > 1)


def caption(text: str) -> Any:
    """A caption above an output shown without Gradio's label badge (which covers the output's top edge)."""
    return gr.Markdown(f"**{text}**", elem_classes="output-caption")


def captioned_figure(text: str, elem_id: str) -> Any:
    """A figure (PNG, not editable) under its :func:`caption`, its download and full-screen buttons above it
    rather than over its headings."""
    caption(text)
    return gr.Image(
        label=text,
        show_label=False,
        format="png",
        interactive=False,
        elem_id=elem_id,
        elem_classes="figure",
        buttons=["download", "fullscreen"],
    )


def clip_player(text: str, elem_id: str) -> Any:
    """Where a video model's clip plays, under its :func:`caption`: an HTML ``<video>`` for MP4, an ``<img>`` for
    the animated WebP written where no MP4 encoder is installed (:mod:`negprompt.interfaces.video`)."""
    from negprompt.interfaces.video import container_for

    caption(text)
    if container_for("clip.png") == "mp4":
        return gr.Video(label=text, show_label=False, interactive=False, autoplay=True, loop=True, elem_id=elem_id)
    return gr.Image(label=text, show_label=False, type="filepath", interactive=False, elem_id=elem_id)


def refused_steps(session: Session, scheduler: str, most: int) -> list[int]:
    """The step counts 1–``most`` this model refuses with ``scheduler`` (a declared ``max_sigma``: the
    schedule's first noise level too high, see docs/training.md); none where it declares no bound."""
    if session.defaults.get("max_sigma") is None:
        return []
    refused = []
    for steps in range(1, most + 1):
        try:
            session.check_schedule(scheduler, steps)
        except NegpromptError:
            refused.append(steps)
    return refused


def steps_label(most: int, refused: list[int], scheduler: str) -> str:
    """The steps field's label: the range the server allows, and the counts in it the model refuses."""
    if not refused:
        return f"Steps (1–{most})"
    shown = ", ".join(map(str, refused[:4])) + (f" … ({len(refused)} counts)" if len(refused) > 4 else "")
    return f"Steps (1–{most}; this model refuses {shown} with {scheduler}: too noisy a start)"
