"""The Generate tab: prompts, negatives with their windows, the rule and its options, the schedule; the
images with their settings.

The tab is built in steps, in the order its components appear: the left column's fields
(:func:`generate_form`), the right column's outputs (:func:`generate_outputs`), then the light events that
keep the fields consistent (:func:`wire_form`) and the event that runs the model (:func:`generate_event`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from negprompt.errors import NegpromptError
from negprompt.guidance.windows import AUTO
from negprompt.interfaces.web import handlers
from negprompt.interfaces.web.handlers import (
    GenerateRequest,
    GenerateResult,
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

RefusedSteps = Callable[[str], list[int]]  # a scheduler's name → the step counts the model refuses with it


@dataclass
class GenerateForm:
    """The Generate tab's input fields (Gradio components), as :func:`generate_form` lays them out."""

    prompt: Any
    family: dict[str, Any]  # the options only some families read, keyed by their GenerateRequest field
    negatives: list[tuple[Any, Any, Any, Any, Any]]  # per negative: text, s⁻, from step, to step, auto end
    every: Any  # K of "compute each negative every K steps"
    rule: Any
    scheduler: Any
    option_groups: dict[str, Any]  # rule name → its options' group (visible while the rule is chosen)
    option_fields: dict[str, dict[str, Any]]  # rule name → option name → field
    scale: Any
    steps: Any
    rescale: Any
    seed: Any
    images: Any
    width: Any
    height: Any
    compare: Any
    compare_start: Any

    def inputs(self, schedule: Any) -> list[Any]:
        """Every field a run reads, and ``schedule`` (the State holding the schedule's UNet calls)."""
        fields = [self.prompt, self.rule, self.scale, self.steps, self.scheduler, self.seed, self.images]
        fields += [self.width, self.height, self.rescale, self.compare, self.compare_start, self.every]
        fields += list(self.family.values())
        fields += [component for row in self.negatives for component in row] + [schedule]
        fields += [component for group in self.option_fields.values() for component in group.values()]
        return fields

    def request(self, values: dict, schedule: Any) -> GenerateRequest:
        """The request of the fields' ``values`` (component → value); a window ending at the schedule's
        last UNet call (the State ``schedule``) runs to the last step."""
        end_of_schedule, chosen = values[schedule], values[self.rule]
        negatives = tuple(
            NegativeInput(
                values[text],
                values[scale],
                values[start],
                AUTO if values[auto] else None if values[end] >= end_of_schedule else values[end],
            )
            for text, scale, start, end, auto in self.negatives
        )
        return GenerateRequest(
            prompt=values[self.prompt],
            negatives=negatives,
            rule=chosen,
            rule_options={name: values[field] for name, field in self.option_fields.get(chosen, {}).items()},
            scale=values[self.scale],
            steps=values[self.steps],
            scheduler=values[self.scheduler],
            seed=values[self.seed],
            images=values[self.images],
            width=values[self.width],
            height=values[self.height],
            rescale=values[self.rescale],
            compare=values[self.compare],
            compare_start=values[self.compare_start],
            negative_every=values[self.every],
            **{name: values[field] for name, field in self.family.items()},
        )


@dataclass
class GenerateOutputs:
    """The Generate tab's outputs (Gradio components), as :func:`generate_outputs` lays them out."""

    preview: Any  # x̂₀ at the latest step
    player: Any  # the first seed's video (video models; else None)
    gallery: Any
    infotext: Any
    economy: Any  # where auto ends stopped, and the rows computed
    files: Any
    comparison: Any

    def components(self) -> list[Any]:
        return [self.preview, self.gallery, self.infotext, self.economy, self.files, self.comparison] + (
            [self.player] if self.player else []
        )

    def cleared(self) -> dict:
        """The updates that empty the outputs when a run starts (the player keeps its clip)."""
        return {
            self.gallery: None,
            self.files: None,
            self.infotext: "",
            self.economy: "",
            self.comparison: None,
            self.preview: None,
        }

    def shown(self, panel: JobPanel, result: GenerateResult) -> dict:
        """The updates that show a finished run's ``result``."""
        made = result.pngs + result.videos
        return {
            panel.status: f"done: {len(made)} {'video' if result.videos else 'image'}(s) in {result.seconds:.2f} s",
            self.gallery: [(str(path), path.name) for path in made],
            self.files: [str(path) for path in made],
            **({self.player: str(result.videos[0]) if result.videos else None} if self.player is not None else {}),
            self.infotext: result.infotext,
            self.economy: result.negative_stops,
            self.comparison: [(str(path), caption) for path, caption in result.comparison] or None,
        }


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
    """The tab's fields, outputs and events; its model event and its job panel."""
    refused = functools.lru_cache(maxsize=None)(lambda name: refused_steps(session, name, limits.steps))
    with gr.Row():
        with gr.Column(scale=1):
            form = generate_form(session, limits, rules, calls, side, multiple, refused)
            panel = JobPanel("generate", "Generate", jobs)
        with gr.Column(scale=1):
            shown = generate_outputs(session)
    schedule = gr.State(calls)
    wire_form(session, limits, form, schedule, refused)
    return [generate_event(session, limits, folders, jobs, form, shown, schedule, panel)], panel


def generate_form(
    session: Session,
    limits: ServerLimits,
    rules: dict,
    calls: int,
    side: int,
    multiple: int,
    refused: RefusedSteps,
) -> GenerateForm:
    """The left column's fields, top to bottom: prompts and negatives, rule and scheduler (with the rule's
    options), scale and steps, seeds and size, the side-by-side comparison."""
    prompt, family, negatives, every = prompt_fields(session, limits, calls)
    with gr.Row():
        rule = gr.Dropdown(list(rules), value="sd", label="Rule", elem_id="generate-rule")
        scheduler = gr.Dropdown(
            list(SCHEDULER_NAMES),
            value=session.defaults["scheduler"],
            label="Scheduler",
            elem_id="generate-scheduler",
        )
    option_groups, option_fields = rule_option_fields(rules, "sd")
    scale, steps, rescale = scale_fields(session, limits, refused)
    seed, images, width, height = image_fields(limits, side, multiple)
    compare, compare_start = compare_fields(calls)
    return GenerateForm(
        prompt=prompt,
        family=family,
        negatives=negatives,
        every=every,
        rule=rule,
        scheduler=scheduler,
        option_groups=option_groups,
        option_fields=option_fields,
        scale=scale,
        steps=steps,
        rescale=rescale,
        seed=seed,
        images=images,
        width=width,
        height=height,
        compare=compare,
        compare_start=compare_start,
    )


def prompt_fields(
    session: Session, limits: ServerLimits, calls: int
) -> tuple[Any, dict[str, Any], list[tuple[Any, Any, Any, Any, Any]], Any]:
    """The prompt, the family's own options, the negatives (the first shown, the others folded) and K of
    "compute each negative every K steps"."""
    example, example_negative = handlers.example_pair(session)
    prompt = gr.Textbox(label="Prompt", value=example, elem_id="generate-prompt")
    family = family_option_fields(session, limits)
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
    return prompt, family, negatives, every


def scale_fields(session: Session, limits: ServerLimits, refused: RefusedSteps) -> tuple[Any, Any, Any]:
    """A row: the guidance scale s, the steps (the label names the counts the default scheduler refuses)
    and the guidance rescale φ."""
    defaults = session.defaults
    with gr.Row():
        scale = gr.Number(label="Scale s", value=float(defaults["scale"]), elem_id="generate-scale")
        steps = gr.Number(
            label=steps_label(limits.steps, refused(defaults["scheduler"]), defaults["scheduler"]),
            value=defaults["steps"],
            precision=0,
            elem_id="generate-steps",
        )
        rescale = gr.Slider(0, 1, value=0, step=0.05, label="Guidance rescale φ", elem_id="generate-rescale")
    return scale, steps, rescale


def image_fields(limits: ServerLimits, side: int, multiple: int) -> tuple[Any, Any, Any, Any]:
    """A row: the first seed (as text), the number of images, their width and height."""
    with gr.Row():
        seed = gr.Textbox(label="Seed (first; 0–2⁶⁴−1)", value=str(EXAMPLE_SEED), elem_id="generate-seed")
        images = gr.Number(
            label=f"Images (1–{limits.images}: seeds from the first)",
            value=1,
            precision=0,
            elem_id="generate-images-count",
        )
        width = gr.Number(label=f"Width (multiple of {multiple})", value=side, precision=0, elem_id="generate-width")
        height = gr.Number(label=f"Height (multiple of {multiple})", value=side, precision=0, elem_id="generate-height")
    return seed, images, width, height


def compare_fields(calls: int) -> tuple[Any, Any]:
    """A row: whether to run the side-by-side comparison, and the delayed negative's first step."""
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
    return compare, compare_start


def generate_outputs(session: Session) -> GenerateOutputs:
    """The right column: the x̂₀ preview, the images (or videos), their settings, the cheap negatives' record,
    the PNG files and the side-by-side comparison."""
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
    infotext, economy, files = record_outputs()
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
    return GenerateOutputs(preview, player, gallery, infotext, economy, files, comparison)


def record_outputs() -> tuple[Any, Any, Any]:
    """The run's infotext, the cheap negatives' record (where auto ends stopped, the rows computed) and the
    PNG files."""
    infotext = gr.Textbox(label="Infotext (PNG 'parameters')", lines=3, interactive=False, elem_id="generate-info")
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
    return infotext, economy, files


def wire_form(session: Session, limits: ServerLimits, form: GenerateForm, schedule: Any, refused: RefusedSteps) -> None:
    """The light events (no queue): a new step count or scheduler moves the window sliders onto the new
    schedule and renames the steps field; a new rule shows its options."""
    starts = [start for _, _, start, _, _ in form.negatives]
    ends = [end for _, _, _, end, _ in form.negatives]

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

    for trigger in (form.steps.change, form.scheduler.change):
        trigger(
            on_schedule,
            [form.steps, form.scheduler, schedule, *starts, *ends, form.compare_start],
            [*starts, *ends, form.compare_start, schedule],
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
    groups = form.option_groups
    form.rule.change(
        lambda chosen: [gr.update(visible=name == chosen) for name in groups],
        form.rule,
        list(groups.values()),
        queue=False,
        api_name=False,
    )


def generate_event(
    session: Session,
    limits: ServerLimits,
    folders: JobFolders,
    jobs: PageJobs,
    form: GenerateForm,
    shown: GenerateOutputs,
    schedule: Any,
    panel: JobPanel,
) -> Any:
    """The Generate button's event: the fields' request run as the visitor's job, its x̂₀ previews streamed
    to the page, then its images, files and settings."""

    def on_generate(values: dict, request: gr.Request) -> Iterator[dict]:
        folder = folders.new()
        yield shown.cleared()
        yield from panel.follow(
            jobs,
            request.session_hash,
            PageJob(preview_seconds=UPDATE_SECONDS),
            lambda job: handlers.generate(session, form.request(values, schedule), limits, folder, job),
            lambda result: shown.shown(panel, result),
            preview=shown.preview,
        )

    outputs = panel.outputs(*shown.components())
    return model_event(panel, on_generate, set(form.inputs(schedule)), outputs, "generate")


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
