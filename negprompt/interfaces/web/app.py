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

import io
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gradio as gr

from negprompt.guidance.rules import all_rules
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.attention_tab import attention_tab
from negprompt.interfaces.web.edit_tab import edit_tab
from negprompt.interfaces.web.generate_tab import generate_tab
from negprompt.interfaces.web.page_jobs import JobFolders, JobPanel, PageJobs
from negprompt.interfaces.web.settings import LOG_LINE_CHARS, UPLOAD_LIMIT, ServerLimits
from negprompt.session import Session

CSS = """
.pixelated img { image-rendering: pixelated; }
#generate-preview img, #attention-image img { width: 160px; height: 160px; object-fit: contain; }
.figure .icon-button-wrapper.top-panel { position: static !important; justify-content: flex-end; box-shadow: none; }
.output-caption p { margin: 0.4em 0 0 0; font-size: var(--block-label-text-size); }
#generate-comparison .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#generate-comparison .thumbnail-item > img { aspect-ratio: 1; height: auto; }
#generate-comparison .caption-label {
  position: static; max-width: none; white-space: normal; opacity: 1; border: none; text-align: center;
}
"""


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
            return jobs.cancel(request.session_hash)

        for panel in panels:
            panel.cancel.click(on_cancel, None, panel.status, queue=False, cancels=model_events, api_name=False)
        # A queued no-op when a page opens: the server's first queued event costs about 0.6 s of set-up,
        # paid here instead of after the visitor's first click.
        page.load(lambda: None, None, None, concurrency_id="page-load", concurrency_limit=None, api_name=False)

        def on_leave(request: gr.Request) -> None:
            jobs.leave(request.session_hash)

        page.unload(on_leave)
    return page


# ---------------------------------------------------------------- serving


def stop_on_terminate(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl+C: Gradio closes the server and the job folders are removed."""
    raise KeyboardInterrupt


class CutLongLines(io.TextIOBase):
    """A text stream that passes lines of at most ``limit`` characters on to ``target`` and cuts longer
    ones, saying how much was cut: the server's log stays readable when a request carries megabytes
    (Gradio prints the inputs of a malformed request whole in the traceback it logs)."""

    def __init__(self, target: Any, limit: int = LOG_LINE_CHARS) -> None:
        self.target, self.limit = target, limit
        self.column, self.cut = 0, 0  # characters written and cut on the current line
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            out = []
            for index, part in enumerate(text.split("\n")):
                if index:  # a newline ends the line before this part
                    out.append(f" … [{self.cut} more characters cut]\n" if self.cut else "\n")
                    self.column, self.cut = 0, 0
                kept = part[: max(0, self.limit - self.column)]
                out.append(kept)
                self.column += len(kept)
                self.cut += len(part) - len(kept)
            self.target.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.target.encoding


@contextmanager
def bounded_log_lines(limit: int = LOG_LINE_CHARS) -> Iterator[None]:
    """While serving, stdout and stderr (the server's log) cut lines longer than ``limit`` characters."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = CutLongLines(sys.stdout, limit), CutLongLines(sys.stderr, limit)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``[::1]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(session: Session, host: str, port: int, limits: ServerLimits) -> None:
    """Serves the page on ``host``:``port`` until interrupted (Ctrl+C)."""
    folders = JobFolders()
    handlers.warm_up(session, folders.new())
    page = build_app(session, limits, folders)
    page.queue(max_size=limits.queue, default_concurrency_limit=1)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    address = f"http://{url_host(host)}:{port}"
    print(f"negprompt serve: {address} ({session.model} on {session.device}; Ctrl+C stops)", flush=True)
    if threading.current_thread() is threading.main_thread():  # a service manager's stop ends it as Ctrl+C does
        signal.signal(signal.SIGTERM, stop_on_terminate)
    try:
        with bounded_log_lines():
            page.launch(
                server_name=url_host(host),  # Gradio takes an IPv6 address in brackets (it builds URLs from it)
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
                max_file_size=UPLOAD_LIMIT,
            )
    finally:
        folders.remove()
