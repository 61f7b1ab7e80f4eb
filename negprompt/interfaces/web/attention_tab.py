"""The Attention tab: a run's cross-attention maps of chosen words, by step, with their summary."""

from __future__ import annotations

import functools
from collections.abc import Iterator
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


def attention_tab(
    session: Session, limits: ServerLimits, folders: JobFolders, jobs: PageJobs, rules: dict
) -> tuple[list[Any], JobPanel]:
    defaults = session.defaults
    refused = functools.lru_cache(maxsize=None)(lambda name: refused_steps(session, name, limits.steps))
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
                    label=steps_label(limits.steps, refused(defaults["scheduler"]), defaults["scheduler"]),
                    value=defaults["steps"],
                    precision=0,
                    elem_id="attention-steps",
                )
                seed = gr.Textbox(label="Seed (0–2⁶⁴−1)", value=str(EXAMPLE_SEED), elem_id="attention-seed")
                columns = gr.Slider(2, 20, value=10, step=1, label="Steps in the timeline", elem_id="attention-columns")
            makes_video = session.components.family.makes_video
            frames = gr.Number(
                label=f"Frames of the video (1–{limits.frames})",
                value=min(defaults.get("frames", 1), limits.frames),
                precision=0,
                visible=makes_video,
                elem_id="attention-frames",
            )
            panel = JobPanel("attention", "Capture attention", jobs)
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
        with gr.Column(scale=2):
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
            frames=values[frames] if makes_video else None,
        )

        def show(result: handlers.AttentionResult) -> dict:
            first = handlers.content_word(result.negative_words)
            try:
                rt, note = handlers.strength_view(result.capture, first)
            except Exception as error:  # e.g. no content word captured on the positive branch
                rt, note = None, error_message(error)
            kept = result.steps
            latent = result.latent_frames or 1
            return {
                panel.status: f"captured {len(kept)} steps" + (f", {latent} latent frames" if result.is_video else ""),
                **({image: str(result.png)} if video is None else {video: str(result.png)}),
                frame: gr.update(maximum=max(latent - 1, 1), value=0, interactive=latent > 1),
                figure: result.timeline,
                # one captured step (steps = 1): Gradio's sliders need minimum < maximum, so a fixed 0–1
                step: gr.update(
                    minimum=kept[0], maximum=max(kept[-1], kept[0] + 1), value=kept[-1], interactive=len(kept) > 1
                ),
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

    fields = {prompt, negative, words, negative_words, rule, scale, steps, scheduler, seed, columns, frames}
    outputs = panel.outputs(image, figure, step, step_figure, word, curve, related, captured, frame)
    outputs |= {video} if video is not None else set()
    event = model_event(panel, on_capture, fields, outputs, "attention")

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
            return handlers.frame_view(session, result, latent, shown), handlers.step_view(
                session, result, chosen, latent
            )
        except handlers.NegpromptError:
            return gr.skip(), gr.skip()

    def on_word(chosen: str, result: Any) -> tuple[Any, str]:
        if result is None or not chosen:
            return None, ""
        try:
            return handlers.strength_view(result, chosen)
        except Exception as error:
            return None, error_message(error)

    step.change(on_step, [step, captured, frame], step_figure, queue=False, api_name=False)
    frame.change(on_frame, [frame, step, columns, captured], [figure, step_figure], queue=False, api_name=False)
    scheduler.change(
        lambda name: gr.update(label=steps_label(limits.steps, refused(name), name)) if name else gr.skip(),
        scheduler,
        steps,
        queue=False,
        api_name=False,
    )
    word.change(on_word, [word, captured], [curve, related], queue=False, api_name=False)
    return [event], panel
