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

import signal
import threading
from typing import Any

import gradio as gr

from negprompt.guidance.rules import all_rules
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.attention_tab import attention_tab
from negprompt.interfaces.web.edit_tab import edit_tab
from negprompt.interfaces.web.generate_tab import generate_tab
from negprompt.interfaces.web.page_jobs import JobFolders, JobPanel, PageJobs
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.session import Session

CSS = """
.pixelated img { image-rendering: pixelated; }
#generate-preview img, #attention-image img { width: 160px; height: 160px; object-fit: contain; }
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
            return "cancelled" if jobs.cancel(request.session_hash) else "nothing to cancel"

        for panel in panels:
            panel.cancel.click(on_cancel, None, panel.status, queue=False, cancels=model_events, api_name=False)
        # A queued no-op when a page opens: the server's first queued event costs about 0.6 s of set-up,
        # paid here instead of after the visitor's first click.
        page.load(lambda: None, None, None, concurrency_id="page-load", concurrency_limit=None, api_name=False)
    return page


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
