"""The Edit tab: a negative switched on late as a local edit, and the sweep over its start step.

The tab is built in steps, in the order its components appear: the edit's fields (:func:`edit_fields`), the
job panel, the sweep's fields (:func:`sweep_fields`), the right column's figures (:func:`edit_views`), then
the events (:func:`edit_events`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class EditForm:
    """The Edit tab's input fields (Gradio components): the edit's, then the start sweep's."""

    prompt: Any
    negative: Any
    start: Any  # the negative's first step
    scale: Any
    steps: Any
    seed: Any
    images: Any
    region: Any
    threshold: Any  # the attention mask's threshold
    every: Any  # the sweep: a start every k steps
    sweep_images: Any
    sweep_run: Any  # the sweep's button

    def edit_request(self, values: dict) -> EditRequest:
        return EditRequest(
            prompt=values[self.prompt],
            negative=values[self.negative],
            start=values[self.start],
            seed=values[self.seed],
            images=values[self.images],
            steps=values[self.steps],
            scale=values[self.scale],
            region=values[self.region],
            threshold=values[self.threshold],
        )

    def sweep_request(self, values: dict) -> SweepRequest:
        return SweepRequest(
            prompt=values[self.prompt],
            negative=values[self.negative],
            every=values[self.every],
            seed=values[self.seed],
            images=values[self.sweep_images],
            steps=values[self.steps],
            scale=values[self.scale],
        )

    def edit_inputs(self) -> set[Any]:
        shared = {self.prompt, self.negative, self.seed, self.steps, self.scale}
        return shared | {self.start, self.images, self.region, self.threshold}

    def sweep_inputs(self) -> set[Any]:
        return {self.prompt, self.negative, self.every, self.seed, self.sweep_images, self.steps, self.scale}


def edit_tab(
    session: Session, limits: ServerLimits, folders: JobFolders, jobs: PageJobs, calls: int
) -> tuple[list[Any], JobPanel]:
    """The tab's fields, figures and events; its two model events (edit, sweep) and its job panel."""
    with gr.Row():
        with gr.Column(scale=1):
            edit = edit_fields(session, limits, calls)
            panel = JobPanel("edit", "Edit", jobs)
            form = EditForm(*edit, *sweep_fields(limits))
        with gr.Column(scale=2):
            figures = edit_views()
    return edit_events(session, limits, folders, jobs, form, figures, panel), panel


def edit_fields(session: Session, limits: ServerLimits, calls: int) -> tuple[Any, ...]:
    """The edit's fields, top to bottom: prompt, negative, its first step; scale, steps, seed and images;
    the region and the attention mask's threshold."""
    defaults = session.defaults
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
        region = gr.Dropdown(["auto", "attention", "detector"], value="auto", label="Region", elem_id="edit-region")
        threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Attention-mask threshold")
    return prompt, negative, start, scale, steps, seed, images, region, threshold


def sweep_fields(limits: ServerLimits) -> tuple[Any, Any, Any]:
    """Under the job panel: the start sweep's k and images, and its button."""
    gr.Markdown("**Start sweep**: the negative switched on at every k-th step, scored by the model's region finder.")
    with gr.Row():
        every = gr.Slider(1, 10, value=4, step=1, label="Start every k steps", elem_id="sweep-every")
        sweep_images = gr.Number(
            label=f"Images (1–{limits.sweep_images})", value=4, precision=0, elem_id="sweep-images"
        )
    sweep_run = gr.Button("Sweep the start", elem_id="sweep-run")
    return every, sweep_images, sweep_run


def edit_views() -> tuple[Any, Any, Any, Any]:
    """The right column: the edit's figure and table, the sweep's figure and table."""
    figure = captioned_figure(
        "No negative / negative at every step / delayed negative, the change maps and the region", "edit-figure"
    )
    table = gr.Markdown(elem_id="edit-table")
    sweep_figure = captioned_figure("Start sweep: removal against locality", "sweep-figure")
    sweep_table = gr.Markdown(elem_id="sweep-table")
    return figure, table, sweep_figure, sweep_table


def edit_events(
    session: Session,
    limits: ServerLimits,
    folders: JobFolders,
    jobs: PageJobs,
    form: EditForm,
    figures: tuple[Any, Any, Any, Any],
    panel: JobPanel,
) -> list[Any]:
    """A new step count moves the start slider onto the schedule (no queue); the Edit and Sweep buttons run
    their requests as the visitor's job. The two model events."""
    figure, table, sweep_figure, sweep_table = figures

    def on_schedule(steps_value: Any, current: Any) -> Any:
        try:
            return start_update(schedule_range(session, None, steps_value), current)
        except NegpromptError:  # the slider sent no number: leave it as it is
            return gr.skip()

    form.steps.change(on_schedule, [form.steps, form.start], form.start, queue=False, api_name=False)

    def on_edit(values: dict, request: gr.Request) -> Iterator[dict]:
        asked = form.edit_request(values)
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_every=0),
            lambda job: handlers.edit(session, asked, limits, job),
            lambda result: {panel.status: "done", figure: result.figure, table: result.table},
            unit="UNet call",
        )

    def on_sweep(values: dict, request: gr.Request) -> Iterator[dict]:
        asked = form.sweep_request(values)
        folder = folders.new()
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_every=0),
            lambda job: handlers.sweep(session, asked, limits, folder, job),
            lambda result: {panel.status: "done", sweep_figure: str(result.figure), sweep_table: result.table},
            unit="UNet call",
        )

    edit_outputs, sweep_outputs = panel.outputs(figure, table), panel.outputs(sweep_figure, sweep_table)
    return [
        model_event(panel, on_edit, form.edit_inputs(), edit_outputs, "edit"),
        model_event(panel, on_sweep, form.sweep_inputs(), sweep_outputs, "sweep", form.sweep_run),
    ]
