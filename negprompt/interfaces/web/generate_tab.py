"""The Generate tab: prompts, negatives with their windows, the rule and its options, the schedule; the
images with their settings."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import gradio as gr

from negprompt.errors import NegpromptError
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
            caption("Images")
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
    starts = [start for _, _, start, _ in negatives]
    ends = [end for _, _, _, end in negatives]

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
