"""The Edit tab: a negative switched on late as a local edit, and the sweep over its start step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from negprompt.errors import NegpromptError
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    EditRequest,
    PageJob,
    SweepRequest,
)
from negprompt.interfaces.web.page_jobs import (
    JobFolders,
    JobPanel,
    PageJobs,
    captioned_figure,
    model_event,
    refused_steps,
    schedule_range,
    start_range,
    start_update,
    steps_label,
)
from negprompt.interfaces.web.settings import EDIT_START, EXAMPLE_SEED, ServerLimits
from negprompt.session import Session


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
                0,
                start_range(calls),
                value=min(EDIT_START, calls - 1),
                step=1,
                label="The negative from step",
                interactive=calls > 1,
                elem_id="edit-start",
            )
            with gr.Row():
                scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="edit-scale")
                scheduler = defaults["scheduler"]
                steps = gr.Number(
                    label=steps_label(limits.steps, refused_steps(session, scheduler, limits.steps), scheduler),
                    value=defaults["steps"],
                    precision=0,
                    elem_id="edit-steps",
                )
                seed = gr.Textbox(label="Seed (first; 0–2⁶⁴−1)", value=str(EXAMPLE_SEED), elem_id="edit-seed")
                images = gr.Number(label=f"Images (1–{limits.images})", value=2, precision=0, elem_id="edit-images")
            with gr.Row():
                region = gr.Dropdown(
                    ["auto", "attention", "detector"], value="auto", label="Region", elem_id="edit-region"
                )
                threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Attention-mask threshold")
            panel = JobPanel("edit", "Edit", jobs)
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
            figure = captioned_figure(
                "No negative / negative at every step / delayed negative, the change maps and the region", "edit-figure"
            )
            table = gr.Markdown(elem_id="edit-table")
            sweep_figure = captioned_figure("Start sweep: removal against locality", "sweep-figure")
            sweep_table = gr.Markdown(elem_id="sweep-table")

    def on_schedule(steps_value: Any, current: Any) -> Any:
        try:
            return start_update(schedule_range(session, None, steps_value), current)
        except NegpromptError:  # the slider sent no number: leave it as it is
            return gr.skip()

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
