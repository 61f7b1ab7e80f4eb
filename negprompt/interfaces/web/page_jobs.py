"""The page's jobs: one folder per job, each page's running job (for its Cancel button), a job's steps
streamed to the page from a thread of its own, a tab's run/cancel panel, and the events that run the model."""

from __future__ import annotations

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

from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    PageJob,
    error_message,
)

if TYPE_CHECKING:
    from negprompt.session import Session

MODEL_QUEUE = "model"  # the concurrency id of every event that runs the model
UPDATE_SECONDS = 0.2  # a job's progress and x̂₀ reach the page at most this often
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


def schedule_range(session: Session, scheduler: str | None, steps: Any) -> int:
    """UNet calls of a schedule (the range of the window sliders); the model's default on bad input."""
    try:
        return handlers.schedule_length(session, scheduler, steps)
    except Exception:  # a bad step count is reported when the run is asked for, not while typing
        return handlers.schedule_length(session, None, None)
