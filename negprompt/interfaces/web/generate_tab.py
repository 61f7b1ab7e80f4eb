"""The Generate tab: prompts, negatives with their windows, the rule and its options, the schedule; the
images with their settings."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import gradio as gr

from negprompt.errors import NegpromptError
from negprompt.guidance.windows import AUTO
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    GenerateRequest,
    NegativeInput,
    PageJob,
)
from negprompt.interfaces.web.page_jobs import (
    UPDATE_SECONDS,
    JobFolders,
    JobPanel,
    PageJobs,
    caption,
    clip_player,
    end_range,
    model_event,
    refused_steps,
    schedule_range,
    start_range,
    start_update,
    steps_label,
    window_updates,
)
from negprompt.interfaces.web.settings import EXAMPLE_SEED, ServerLimits
from negprompt.sampling.schedulers import SCHEDULER_NAMES
from negprompt.session import Session


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
    refused = functools.lru_cache(maxsize=None)(lambda name: refused_steps(session, name, limits.steps))
    with gr.Row():
        with gr.Column(scale=1):
            example, example_negative = handlers.example_pair(session)
            prompt = gr.Textbox(label="Prompt", value=example, elem_id="generate-prompt")
            family_fields = family_option_fields(session, limits)
            negatives = [negative_fields(0, calls, example_negative)]
            if limits.negatives > 1:
                with gr.Accordion(f"Negatives 2–{limits.negatives}", open=False):
                    negatives += [negative_fields(index, calls) for index in range(1, limits.negatives)]
            every = gr.Number(
                label="Compute each negative every K steps, its difference reused between (rules sd, dual; 1: every step)",
                value=1,
                precision=0,
                elem_id="generate-negative-every",
            )
            with gr.Row():
                rule = gr.Dropdown(list(rules), value="sd", label="Rule", elem_id="generate-rule")
                scheduler = gr.Dropdown(
                    list(SCHEDULER_NAMES), value=defaults["scheduler"], label="Scheduler", elem_id="generate-scheduler"
                )
            option_groups, option_fields = rule_option_fields(rules, "sd")
            with gr.Row():
                scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="generate-scale")
                steps = gr.Number(
                    label=steps_label(limits.steps, refused(defaults["scheduler"]), defaults["scheduler"]),
                    value=defaults["steps"],
                    precision=0,
                    elem_id="generate-steps",
                )
                rescale = gr.Slider(0, 1, value=0, step=0.05, label="Guidance rescale φ", elem_id="generate-rescale")
            with gr.Row():
                seed = gr.Textbox(label="Seed (first; 0–2⁶⁴−1)", value=str(EXAMPLE_SEED), elem_id="generate-seed")
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
                    value=True,
                    elem_id="generate-compare",
                )
                compare_start = gr.Slider(
                    0,
                    start_range(calls),
                    value=calls // 4,
                    step=1,
                    label="delayed from step",
                    interactive=calls > 1,
                    elem_id="generate-compare-start",
                )
            panel = JobPanel("generate", "Generate", jobs)
        with gr.Column(scale=1):
            # Outputs carry no label badge (it would cover the image's top); a caption above names them.
            caption("x̂₀, the predicted clean image, at the latest step")
            preview = gr.Image(
                label="x̂₀, the predicted clean image, at the latest step",
                show_label=False,
                format="png",
                interactive=False,
                height=192,
                elem_id="generate-preview",
                elem_classes="pixelated",
            )
            makes_video = session.components.family.makes_video
            player = clip_player("Video (the first seed's)", "generate-video") if makes_video else None
            caption("Videos: each seed's clip" if makes_video else "Images")
            gallery = gr.Gallery(
                label="Images",
                show_label=False,
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
            economy = gr.Textbox(
                label="Cheap negatives: where an auto end stopped, and the rows computed",
                lines=2,
                interactive=False,
                elem_id="generate-economy",
            )
            files = gr.File(
                label="The PNGs, as negprompt generate writes them (negprompt generate --from-png FILE re-runs them)",
                file_count="multiple",
                interactive=False,
                elem_id="generate-files",
            )
            caption("Side by side: no negative / negative / delayed negative")
            comparison = gr.Gallery(
                label="No negative / negative / delayed negative",
                show_label=False,
                columns=3,
                height="auto",
                object_fit="contain",
                preview=False,
                elem_id="generate-comparison",
                elem_classes="pixelated",
            )

    schedule = gr.State(calls)
    starts = [start for _, _, start, _, _ in negatives]
    ends = [end for _, _, _, end, _ in negatives]

    def on_schedule(steps_value: Any, scheduler_value: str, old: int, *values: Any) -> list[Any]:
        """The window sliders (and the delayed start) moved onto the new schedule's UNet calls."""
        new = schedule_range(session, scheduler_value, steps_value)
        start_values, end_values, delayed = values[: len(starts)], values[len(starts) : -1], values[-1]
        try:
            windows = [window_updates(new, old, a, b) for a, b in zip(start_values, end_values)]
            delayed_update = start_update(new, delayed)
        except NegpromptError:  # a slider sent no number: leave the page as it is
            return [gr.skip()] * (2 * len(starts) + 2)
        return [*(a for a, _ in windows), *(b for _, b in windows), delayed_update, new]

    for trigger in (steps.change, scheduler.change):
        trigger(
            on_schedule,
            [steps, scheduler, schedule, *starts, *ends, compare_start],
            [*starts, *ends, compare_start, schedule],
            queue=False,
            api_name=False,
        )
    scheduler.change(
        lambda name: gr.update(label=steps_label(limits.steps, refused(name), name)) if name else gr.skip(),
        scheduler,
        steps,
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

    fields = [
        prompt,
        rule,
        scale,
        steps,
        scheduler,
        seed,
        images,
        width,
        height,
        rescale,
        compare,
        compare_start,
        every,
    ]
    fields += list(family_fields.values())
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
                    AUTO if values[auto] else None if values[end] >= end_of_schedule else values[end],
                )
                for text, scale_field, start, end, auto in negatives
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
            negative_every=values[every],
            **{name: values[field] for name, field in family_fields.items()},
        )

    def on_generate(values: dict, request: gr.Request) -> Iterator[dict]:
        folder = folders.new()
        yield {gallery: None, files: None, infotext: "", economy: "", comparison: None, preview: None}
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_seconds=UPDATE_SECONDS),
            lambda job: handlers.generate(session, request_of(values), limits, folder, job),
            lambda result: {
                panel.status: f"done: {len(result.pngs + result.videos)} {'video' if result.videos else 'image'}(s) "
                f"in {result.seconds:.2f} s",
                gallery: [(str(path), path.name) for path in result.pngs + result.videos],
                files: [str(path) for path in result.pngs + result.videos],
                **({player: str(result.videos[0]) if result.videos else None} if player is not None else {}),
                infotext: result.infotext,
                economy: result.negative_stops,
                comparison: [(str(path), caption) for path, caption in result.comparison] or None,
            },
            preview=preview,
        )

    outputs = panel.outputs(preview, gallery, infotext, economy, files, comparison, *([player] if player else []))
    return [model_event(panel, on_generate, set(fields), outputs, "generate")], panel


def negative_fields(index: int, calls: int, example: str = "") -> tuple[Any, Any, Any, Any, Any]:
    """A negative prompt's text, its scale s⁻, its step window [from, to) as two sliders on the schedule, and
    whether its end is auto instead (``--negative-window START:auto``)."""
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
                0,
                start_range(calls),
                value=0,
                step=1,
                label="from step",
                interactive=calls > 1,
                elem_id=f"generate-window-start-{index}",
            )
            end = gr.Slider(
                1,
                end_range(calls),
                value=calls,
                interactive=calls > 1,
                step=1,
                label="to step (right end: the last)",
                elem_id=f"generate-window-end-{index}",
            )
        auto = gr.Checkbox(
            label="to: auto, where its effect has converged (rules sd, dual; the slider's end is then not used)",
            value=False,
            elem_id=f"generate-window-auto-{index}",
        )
    return text, scale, start, end, auto


def family_option_fields(session: Session, limits: ServerLimits) -> dict[str, Any]:
    """The fields of the options only some families read, shown where the model's family reads them: a
    second text encoder's prompt (SDXL, SD3, FLUX) and the embedded guidance scale w (guidance-distilled
    FLUX), and a video model's frame count. Keyed by their :class:`GenerateRequest` field; elsewhere the
    handlers refuse them in one line."""
    family, components = session.components.family, session.components
    fields: dict[str, Any] = {}
    if family.makes_video:
        fields["frames"] = gr.Number(
            label=f"Frames of each video (1–{limits.frames}; a count the model does not take is named with the nearest)",
            value=min(session.defaults.get("frames", 1), limits.frames),
            precision=0,
            elem_id="generate-frames",
        )
    if family.second_prompt:
        fields["prompt_2"] = gr.Textbox(
            label="Second prompt (the second text encoder's; empty: the prompt)", elem_id="generate-prompt-2"
        )
    if family.takes_embedded_guidance(components):
        fields["embedded_guidance"] = gr.Number(
            label="Embedded guidance w (a guidance-distilled model's input)",
            value=session.defaults.get("embedded_guidance"),
            elem_id="generate-embedded-guidance",
        )
    return fields


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
                    option.name: (
                        gr.Textbox(  # a text option (e.g. the guider rule's name and JSON config)
                            label=f"{rule.Settings.flag(option)}: {option.metadata['help']}",
                            value=option.default,
                            elem_id=f"option-{rule.name}-{option.name}",
                        )
                        if rule.Settings.kind(option) is str
                        else gr.Number(
                            label=f"{rule.Settings.flag(option)}: {option.metadata['help']}"
                            + (f" ({option.metadata['unit']})" if option.metadata.get("unit") else ""),
                            value=option.default,
                            precision=0 if rule.Settings.kind(option) is int else None,
                            elem_id=f"option-{rule.name}-{option.name}",
                        )
                    )
                    for option in options
                }
        groups[rule.name] = group
    return groups, fields
