"""The Attention tab: a run's cross-attention maps of chosen words, by step, with their summary.

The tab is built in steps, in the order its components appear: the left column's fields
(:func:`attention_form`), the job panel and the image (:func:`image_outputs`), the right column's maps
(:func:`map_views`), then the event that runs the model (:func:`capture_event`) and the light events that
redraw a captured run's views (:func:`wire_views`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    AttentionRequest,
    PageJob,
    error_message,
)
from negprompt.interfaces.web.page_jobs import (
    JobFolders,
    JobPanel,
    PageJobs,
    caption,
    captioned_figure,
    clip_player,
    model_event,
    refused_steps,
    steps_label,
)
from negprompt.interfaces.web.settings import EXAMPLE_SEED, ServerLimits
from negprompt.sampling.schedulers import SCHEDULER_NAMES
from negprompt.session import Session

RefusedSteps = Callable[[str], list[int]]  # a scheduler's name → the step counts the model refuses with it


@dataclass
class AttentionForm:
    """The Attention tab's input fields (Gradio components), as :func:`attention_form` lays them out."""

    prompt: Any
    negative: Any
    words: Any  # the positive's words to map
    negative_words: Any
    rule: Any
    scheduler: Any
    scale: Any
    steps: Any
    seed: Any
    columns: Any  # steps in the timeline
    frames: Any  # a video's frame count (hidden for image models)

    def inputs(self) -> set[Any]:
        return {
            self.prompt,
            self.negative,
            self.words,
            self.negative_words,
            self.rule,
            self.scale,
            self.steps,
            self.scheduler,
            self.seed,
            self.columns,
            self.frames,
        }

    def request(self, values: dict, makes_video: bool) -> AttentionRequest:
        """The request of the fields' ``values`` (component → value); frames only for a video model."""
        return AttentionRequest(
            prompt=values[self.prompt],
            negative=values[self.negative],
            words=values[self.words],
            negative_words=values[self.negative_words],
            rule=values[self.rule],
            scale=values[self.scale],
            steps=values[self.steps],
            scheduler=values[self.scheduler],
            seed=values[self.seed],
            columns=values[self.columns],
            frames=values[self.frames] if makes_video else None,
        )


@dataclass
class AttentionViews:
    """The Attention tab's outputs (Gradio components) and the captured run they show (a State)."""

    video: Any  # the run's clip (video models; else None)
    image: Any  # the run's image (hidden for video models)
    frame: Any  # the latent frame of a video's maps
    figure: Any  # the heat-map timeline
    step: Any
    step_figure: Any  # the maps at the chosen step
    word: Any  # the negative word of the r_t curve
    curve: Any
    related: Any  # the r_t curve's note
    captured: Any  # State: the run's capture

    def components(self) -> set[Any]:
        shown = {self.image, self.figure, self.step, self.step_figure, self.word, self.curve, self.related}
        return shown | {self.captured, self.frame} | ({self.video} if self.video is not None else set())

    def shown(self, session: Session, panel: JobPanel, result: handlers.AttentionResult) -> dict:
        """The updates that show a finished capture: the image or clip, the timeline, the last step's maps and
        the r_t curve of the first content word of the negative."""
        first = handlers.content_word(result.negative_words)
        try:
            rt, note = handlers.strength_view(result.capture, first)
        except Exception as error:  # e.g. no content word captured on the positive branch
            rt, note = None, error_message(error)
        kept = result.steps
        latent = result.latent_frames or 1
        return {
            panel.status: f"captured {len(kept)} steps" + (f", {latent} latent frames" if result.is_video else ""),
            **({self.image: str(result.png)} if self.video is None else {self.video: str(result.png)}),
            self.frame: gr.update(maximum=max(latent - 1, 1), value=0, interactive=latent > 1),
            self.figure: result.timeline,
            # one captured step (steps = 1): Gradio's sliders need minimum < maximum, so a fixed 0–1
            self.step: gr.update(
                minimum=kept[0], maximum=max(kept[-1], kept[0] + 1), value=kept[-1], interactive=len(kept) > 1
            ),
            self.step_figure: handlers.step_view(session, result.capture, kept[-1]),
            self.word: gr.update(choices=result.negative_words, value=first),
            self.curve: rt,
            self.related: note,
            self.captured: result.capture,
        }


def attention_tab(
    session: Session, limits: ServerLimits, folders: JobFolders, jobs: PageJobs, rules: dict
) -> tuple[list[Any], JobPanel]:
    """The tab's fields, views and events; its model event and its job panel."""
    refused = functools.lru_cache(maxsize=None)(lambda name: refused_steps(session, name, limits.steps))
    makes_video = session.components.family.makes_video
    with gr.Row():
        with gr.Column(scale=1):
            form = attention_form(session, limits, rules, refused, makes_video)
            panel = JobPanel("attention", "Capture attention", jobs)
            video, image, frame = image_outputs(makes_video)
        with gr.Column(scale=2):
            maps = map_views()
    views = AttentionViews(video, image, frame, *maps, captured=gr.State(None))
    event = capture_event(session, limits, folders, jobs, form, views, panel)
    wire_views(session, limits, form, views, refused)
    return [event], panel


def attention_form(
    session: Session, limits: ServerLimits, rules: dict, refused: RefusedSteps, makes_video: bool
) -> AttentionForm:
    """The left column's fields, top to bottom: prompt and negative, the words to map, rule and scheduler,
    scale, steps, seed and the timeline's length, a video's frame count."""
    defaults = session.defaults
    example, example_negative = handlers.example_pair(session)
    prompt = gr.Textbox(label="Prompt", value=f"{example} with a sun" if example else "", elem_id="attention-prompt")
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
    scale, steps, seed, columns = attention_run_fields(session, limits, refused)
    frames = gr.Number(
        label=f"Frames of the video (1–{limits.frames})",
        value=min(defaults.get("frames", 1), limits.frames),
        precision=0,
        visible=makes_video,
        elem_id="attention-frames",
    )
    return AttentionForm(prompt, negative, words, negative_words, rule, scheduler, scale, steps, seed, columns, frames)


def attention_run_fields(session: Session, limits: ServerLimits, refused: RefusedSteps) -> tuple[Any, Any, Any, Any]:
    """A row: the scale s, the steps (the label names the counts the default scheduler refuses), the seed
    and the steps in the timeline."""
    defaults = session.defaults
    with gr.Row():
        scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="attention-scale")
        steps = gr.Number(
            label=steps_label(limits.steps, refused(defaults["scheduler"]), defaults["scheduler"]),
            value=defaults["steps"],
            precision=0,
            elem_id="attention-steps",
        )
        seed = gr.Textbox(label="Seed (0–2⁶⁴−1)", value=str(EXAMPLE_SEED), elem_id="attention-seed")
        columns = gr.Slider(2, 20, value=10, step=1, label="Steps in the timeline", elem_id="attention-columns")
    return scale, steps, seed, columns


def image_outputs(makes_video: bool) -> tuple[Any, Any, Any]:
    """Under the job panel: the run's clip (video models) or image, and the latent frame of a video's maps."""
    video = clip_player("Video", "attention-video") if makes_video else None
    caption("Image")
    image = gr.Image(
        label="Image",
        show_label=False,
        format="png",
        interactive=False,
        height=160,
        elem_id="attention-image",
        elem_classes="pixelated",
        visible=not makes_video,
    )
    # A video's maps have a frame axis: the timeline and the step view show one latent frame.
    frame = gr.Slider(
        0, 1, value=0, step=1, label="Latent frame of the maps", visible=makes_video, elem_id="attention-frame"
    )
    return video, image, frame


def map_views() -> tuple[Any, Any, Any, Any, Any, Any]:
    """The right column: the heat-map timeline; the step slider with that step's maps; the negative word of
    the r_t curve, the curve and its note."""
    figure = captioned_figure(
        "Heat-map timeline (rows: words of the positive, then the negative branch)", "attention-timeline"
    )
    with gr.Row():
        with gr.Column(scale=1):
            step = gr.Slider(0, 1, value=0, step=1, label="Step", elem_id="attention-step")
            step_figure = captioned_figure("The maps at this step", "attention-step-view")
        with gr.Column(scale=2):
            word = gr.Dropdown([], label="Negative word of the r_t curve", elem_id="attention-rt-word")
            curve = captioned_figure("r_t: the negative word's strength", "attention-rt")
            related = gr.Markdown(elem_id="attention-related")
    return figure, step, step_figure, word, curve, related


def capture_event(
    session: Session,
    limits: ServerLimits,
    folders: JobFolders,
    jobs: PageJobs,
    form: AttentionForm,
    views: AttentionViews,
    panel: JobPanel,
) -> Any:
    """The Capture button's event: the fields' request run as the visitor's job, then its image and maps."""
    makes_video = views.video is not None

    def on_capture(values: dict, request: gr.Request) -> Iterator[dict]:
        folder = folders.new()
        asked = form.request(values, makes_video)
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_every=0),
            lambda job: handlers.attend(session, asked, limits, folder, job),
            lambda result: views.shown(session, panel, result),
        )

    return model_event(panel, on_capture, form.inputs(), panel.outputs(*views.components()), "attention")


def wire_views(
    session: Session, limits: ServerLimits, form: AttentionForm, views: AttentionViews, refused: RefusedSteps
) -> None:
    """The light events (no queue): the step, latent frame and word sliders redraw the captured run's views;
    a new scheduler renames the steps field."""

    def on_step(chosen: Any, result: Any, latent: Any) -> Any:
        if result is None:
            return None
        try:
            return handlers.step_view(session, result, chosen, latent if result.frames else None)
        except handlers.NegpromptError:  # a step that was not captured: the view stays
            return gr.skip()

    def on_frame(latent: Any, chosen: Any, shown: Any, result: Any) -> tuple[Any, Any]:
        """A video's timeline and step view at another latent frame."""
        if result is None or not result.frames:
            return gr.skip(), gr.skip()
        try:
            timeline = handlers.frame_view(session, result, latent, shown)
            return timeline, handlers.step_view(session, result, chosen, latent)
        except handlers.NegpromptError:
            return gr.skip(), gr.skip()

    def on_word(chosen: str, result: Any) -> tuple[Any, str]:
        if result is None or not chosen:
            return None, ""
        try:
            return handlers.strength_view(result, chosen)
        except Exception as error:
            return None, error_message(error)

    views.step.change(
        on_step, [views.step, views.captured, views.frame], views.step_figure, queue=False, api_name=False
    )
    views.frame.change(
        on_frame,
        [views.frame, views.step, form.columns, views.captured],
        [views.figure, views.step_figure],
        queue=False,
        api_name=False,
    )
    form.scheduler.change(
        lambda name: gr.update(label=steps_label(limits.steps, refused(name), name)) if name else gr.skip(),
        form.scheduler,
        form.steps,
        queue=False,
        api_name=False,
    )
    views.word.change(on_word, [views.word, views.captured], [views.curve, views.related], queue=False, api_name=False)
