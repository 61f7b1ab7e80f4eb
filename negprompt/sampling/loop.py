"""The one denoising loop of negprompt.

Each step evaluates every branch the guidance needs at that step in one batched denoiser call per group
of images (groups in the same state share it), combines the branch predictions with the guidance
rule and advances the scheduler. A group's call is laid out as when the group runs alone, so its
images are bit-identical whatever else runs beside it (the rows and which groups share a call:
:mod:`negprompt.sampling.rows`). Branches are named (``positive``, ``negative``, ``unconditional``
…), never found by their position in the batch.

The loop encodes no prompt: it is given each prompt text's encoded
:class:`~negprompt.models.conditioning.Conditioning` (made beforehand by the model family's adapter,
see :func:`encode_groups`) and hands them, batched, to the family's ``denoise``, which calls the
denoiser as the family's pipeline does (a UNet with any added inputs; SD3's and FLUX's transformers,
FLUX on packed latents). The family also sets the scheduler's timesteps; a flow-matching scheduler
(SD3, FLUX) makes the predictions velocities (rules not exact on them are refused when the run is
specified). (``UNet`` in names here means the denoiser, whichever it is.)

The settings arrive checked (:class:`~negprompt.runspec.RunSpec`, ``Session.check``): the loop
asserts what it relies on and raises :class:`SamplingError` only for how it is called (conditioning
missing for an input, rows per call with hooks or with a rule that prepares the denoiser).

Observers see each step through a read-only :class:`StepInfo`; a ``UNetCallHook`` is told, before
each denoiser call, which step it is and how the batch is laid out (attention capture uses this).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from negprompt.errors import NegpromptError
from negprompt.guidance.economy import NegativeEconomy
from negprompt.guidance.plan import Guidance, StepContext
from negprompt.layers.layout import AttentionLayout
from negprompt.models.components import Components
from negprompt.models.conditioning import Conditioning, PromptInput
from negprompt.models.family import EmbeddedGuidanceError
from negprompt.sampling.rows import (
    Group,
    GroupPlan,
    Layout,
    RowBlock,
    RowInputs,
    batched_inputs,
    call_rows,
    group_slices,
    input_order,
    layout_at,
    needed_prompts,
    planned_inputs,
    prepares_denoiser,
    row_blocks,
    rule_scopes,
    second_expert_groups,
    shared_calls,
    split_rows,
)
from negprompt.sampling.schedule import alpha_bar_of, denoiser_calls, flow_sigma
from negprompt.sampling.schedulers import is_flow_matching


class SamplingError(NegpromptError):
    """Settings the sampler cannot run with."""


@dataclass(frozen=True)
class StepInfo:
    """What one step saw and did. Tensors are copies: changing them changes nothing.

    latents: x_t the step started from, (B, C, h, w); predictions: each evaluated branch's
    ε (or v), (B, C, h, w) by branch name; guided: the combined prediction; denoised: x̂₀
    estimated from ``guided``, (B, C, h, w), in latent space.
    """

    step: int
    num_steps: int
    timestep: float
    latents: torch.Tensor
    predictions: dict[str, torch.Tensor]
    guided: torch.Tensor
    denoised: torch.Tensor
    group: int = 0  # which group of the run (see Group) the images belong to
    guidance_state: dict[str, torch.Tensor] | None = None  # e.g. DNG's log-odds, before this step's update


StepCallback = Callable[[StepInfo], None]


class UNetCallHook(Protocol):
    """Told before each UNet call which step it is and which rows hold which group's branch."""

    def before_unet_call(self, step: int, timestep: float, blocks: Sequence[RowBlock]) -> None: ...


@dataclass
class SampleOutput:
    """Decoded images (B, H, W, 3) float32 in [0, 1] — a video family's frames (B, F, H, W, 3), in ``images``
    too — the final latents and, on request, the trace."""

    images: np.ndarray
    latents: torch.Tensor
    trace: list[StepInfo] | None
    unet_batch_rows: int  # Σ over steps of the rows fed to the UNet (branches × images)
    num_steps: int  # UNet calls (len of the scheduler's timesteps)
    negative_stops: tuple[dict[str, int | None], ...] = ()  # per group: each auto-ended negative's stop step


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded: images drawn alone or in a batch start from equal noise."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(B, *shape) standard normal noise, image i from generator i (as diffusers' randn_tensor)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators])


def _alpha_bar(scheduler: Any, timestep: torch.Tensor) -> torch.Tensor:
    """ᾱ_t at a (possibly fractional) timestep (see :func:`negprompt.sampling.schedule.alpha_bar_of`), float64."""
    return torch.tensor(alpha_bar_of(scheduler, timestep))


def prediction_type(scheduler: Any) -> str:
    """What the denoiser predicts: "epsilon", "v_prediction", "sample" (the scheduler's config) or
    "flow" (velocity v = ε − x₀ of a flow-matching model)."""
    return "flow" if is_flow_matching(scheduler) else str(scheduler.config.prediction_type)


def predicted_clean(
    scheduler: Any, model_input: torch.Tensor, prediction: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """x̂₀ from the model's input x_t (variance-preserving scale) and its prediction.

    ε-prediction: x̂₀ = (x_t − √(1−ᾱ)ε)/√ᾱ; v-prediction: x̂₀ = √ᾱ x_t − √(1−ᾱ) v;
    flow matching (x_t = (1 − σ)x₀ + σε, v = ε − x₀): x̂₀ = x_t − σv.
    """
    kind = prediction_type(scheduler)
    if kind == "flow":
        return model_input - flow_sigma(scheduler, timestep) * prediction
    alpha_bar = _alpha_bar(scheduler, timestep).to(prediction.dtype)
    if kind == "epsilon":
        return (model_input - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    if kind == "v_prediction":
        return alpha_bar.sqrt() * model_input - (1 - alpha_bar).sqrt() * prediction
    return prediction  # "sample"


def clean_factor(scheduler: Any, model_input: torch.Tensor, timestep: torch.Tensor) -> float:
    """κ_t = |∂x̂₀/∂prediction| at ``timestep``: x̂₀ is affine in the prediction (:func:`predicted_clean`), so
    κ_t is the change of x̂₀ for a unit prediction (√(1−ᾱ)/√ᾱ for ε, √(1−ᾱ) for v, σ for a velocity)."""
    zero = torch.zeros_like(model_input)
    one = predicted_clean(scheduler, zero, torch.ones_like(model_input), timestep)
    return float((one - predicted_clean(scheduler, zero, zero, timestep)).abs().flatten()[0])


def decode(components: Components, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) → images (B, H, W, 3) float32 in [0, 1], by the model family's adapter (a video
    family's (B, C, F', h, w) → frames (B, F, H, W, 3))."""
    return components.family.decode(components, latents)


def encode_groups(
    components: Components,
    groups: Sequence[Group],
    scheduler: Any,
    num_steps: int,
    height: int | None = None,
    width: int | None = None,
) -> dict[PromptInput, Conditioning]:
    """The conditioning :func:`sample_groups` needs for images of ``height`` × ``width`` (default: the
    model's size): each input of the plans encoded once, alone, by the model family's adapter (so an
    image's conditioning never depends on its batch). The groups' plans must fit the schedule (see
    :meth:`negprompt.session.Session.check`)."""
    assert num_steps >= 1, "steps are checked where the run is specified (RunSpec)"
    calls = denoiser_calls("default", scheduler, num_steps)
    return components.family.encode(components, needed_prompts(groups, calls, RowInputs.of(components, height, width)))


@dataclass(frozen=True)
class CallSetup:
    """What every denoiser call of a run shares: the model, each input's encoded conditioning, the
    embedded guidance scale's inputs ({} for models that take none), the hooks told each call's layout,
    and the largest number of rows one call may take (None: whole calls)."""

    components: Components
    conditioning: Mapping[PromptInput, Conditioning]
    guidance_input: Mapping[str, torch.Tensor]
    unet_hooks: Sequence[UNetCallHook] = ()
    max_rows_per_call: int | None = None
    # each branch's batched inputs (denoiser_inputs) by its rows' inputs, made once per run for the rules that
    # prepare the denoiser: the same tensors at every call (NAG's run caches the negative's keys by them)
    batched_inputs: dict[tuple[PromptInput, ...], dict[str, Any]] = field(default_factory=dict, compare=False)


@dataclass
class LoopSetup:
    """What the loop fixes before its first step, and the per-group state it carries from step to step.

    ``groups`` hold each group's guidance (its first expert's, for a family with two), ``second_groups`` the same
    groups with their second expert's scales ([]: no group has one). ``plans``: each group's branches per step;
    ``economies``: each group's skipped negatives (None: every planned row computed); ``states``: each group's rule
    state (e.g. DNG's log-odds), updated in place. ``alpha_bars``: ᾱ at every denoiser call, then 1.0 (the clean
    end). ``slices``: each group's images in the run's batch. ``experts``: which denoiser predicts at each call
    (``family.expert_at``), from one host copy of the timesteps: no host sync per step. ``run_states``: what each
    group's rule yielded when its run scope was entered (``Rule.run_scope``; None: nothing)."""

    setup: CallSetup
    scheduler: Any
    timesteps: torch.Tensor
    groups: Sequence[Group]
    second_groups: list[Group]
    plans: list[GroupPlan]
    economies: list[NegativeEconomy | None]
    states: list[dict[str, torch.Tensor]]
    alpha_bars: list[float]
    rows_inputs: RowInputs
    slices: list[slice]
    attention_layout: AttentionLayout  # the family's, for rules that act in attention
    experts: list[int]
    timestep_values: list[float]  # the timesteps as numbers, from one host copy
    run_states: list[Any] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """Denoiser calls of the run: one per entry of the scheduler's timesteps."""
        return len(self.timesteps)

    def groups_at(self, step: int) -> Sequence[Group]:
        """The groups with the guidance of the expert that denoises at ``step`` (the second's where the family says)."""
        return self.second_groups if self.second_groups and self.experts[step] else self.groups

    def context(self, step: int) -> StepContext:
        """Where ``step`` is in the schedule, for the rules."""
        where = (step, self.calls, self.alpha_bars[step], self.alpha_bars[step + 1], self.attention_layout)
        return StepContext(*where, self.experts[step], timestep=float(self.timestep_values[step]))


@torch.inference_mode()
def sample_groups(
    components: Components,
    groups: Sequence[Group],
    scheduler: Any,
    num_steps: int,
    height: int,
    width: int,
    callback: StepCallback | None = None,
    keep_trace: bool = False,
    unet_hooks: Sequence[UNetCallHook] = (),
    progress: bool = False,
    eta: float = 0.0,
    max_rows_per_call: int | None = None,
    *,
    conditioning: Mapping[PromptInput, Conditioning],
    embedded_guidance: float | None = None,
    frames: int = 1,
    scales_2: Sequence[float | None] = (),
) -> SampleOutput:
    """The denoising loop for several groups of images at once, one batched UNet call per group and step.

    ``conditioning`` maps every prompt text the plans evaluate to its encoded conditioning (see :func:`encode_groups`);
    the UNet gets them batched as ``encoder_hidden_states`` and, when the family provides them, ``added_cond_kwargs``.
    Each group's call holds only its own rows, in the order it has when run alone; groups in the same state at a step
    (e.g. a delayed negative before its window opens and the plain run) share one call (:mod:`negprompt.sampling.rows`).

    ``max_rows_per_call`` splits each call into chunks of at most so many rows: the images agree up to float rounding
    (measured ≤ 2e-5), and on a CPU very large batches cost more per row. It is a setting to record with the output
    (``RunSpec.rows_per_call``), and cannot be combined with ``unet_hooks``, which see whole calls.
    ``embedded_guidance``: the guidance scale w given to a guidance-distilled UNet (one whose config has
    ``time_cond_proj_dim``) with every row, as ``timestep_cond``; such a UNet needs it, others refuse it.
    ``frames``: the frame count of a video family's videos (latents (B, C, F', h, w)); 1 for images.
    ``scales_2``: per group, the guidance scale of the steps the family gives its second expert (``family.expert_at``:
    Wan 2.2's low-noise transformer); None or none given: the group's scale at every step.

    All groups share the schedule. Images come out in group order. ``scheduler`` is consumed (its state advances);
    pass a fresh one per call. ``num_steps`` is given to ``scheduler.set_timesteps``; the loop runs one UNet call per
    entry of ``scheduler.timesteps`` and windows count those calls. The settings are checked before
    (:class:`~negprompt.runspec.RunSpec` and :meth:`negprompt.session.Session.check`: steps, seeds, size, windows, the
    rule on this model); the loop asserts what it relies on.
    """
    assert num_steps >= 1 and groups and all(group.seeds for group in groups), "checked by RunSpec"
    assert height % components.size_multiple == 0 and width % components.size_multiple == 0, "checked by Session"
    setup = _call_setup(components, groups, conditioning, embedded_guidance, unet_hooks, max_rows_per_call)
    run = _set_up_loop(setup, groups, scales_2, scheduler, num_steps, height, width)
    latents, step_keywords = _starting_latents(run, height, width, frames, eta)
    trace: list[StepInfo] | None = [] if keep_trace else None
    rows = 0
    denoisers = components.family.denoisers(components)
    with rule_scopes(groups, denoisers, run.attention_layout) as run.run_states:  # e.g. NAG's processors, once
        for step, t in enumerate(tqdm(run.timesteps, disable=not progress, unit="step", leave=False)):
            groups_now, context = run.groups_at(step), run.context(step)
            model_input = (
                scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            )
            predictions_of, step_rows = _evaluate_branches(run, groups_now, latents, model_input, t, context)
            rows += step_rows
            guided = _guide_groups(run, groups_now, predictions_of, latents, model_input, t, context, callback, trace)
            latents = scheduler.step(guided, t, latents, **step_keywords, return_dict=False)[0]
    return _sample_output(run, latents, trace, rows)


def _call_setup(
    components: Components,
    groups: Sequence[Group],
    conditioning: Mapping[PromptInput, Conditioning],
    embedded_guidance: float | None,
    unet_hooks: Sequence[UNetCallHook],
    max_rows_per_call: int | None,
) -> CallSetup:
    """What every denoiser call shares, after checking the split in chunks and the embedded guidance scale."""
    _check_rows_per_call(groups, max_rows_per_call, unet_hooks)
    try:
        guidance_input = components.family.guidance_inputs(components, embedded_guidance)
    except EmbeddedGuidanceError as error:
        raise SamplingError(str(error)) from None
    return CallSetup(components, conditioning, guidance_input, unet_hooks, max_rows_per_call)


def _set_up_loop(
    setup: CallSetup,
    groups: Sequence[Group],
    scales_2: Sequence[float | None],
    scheduler: Any,
    num_steps: int,
    height: int,
    width: int,
) -> LoopSetup:
    """Sets the scheduler's timesteps (as the family's pipeline does) and plans every group's branches on them;
    checks that every input the plans use has its conditioning."""
    components = setup.components
    settings = components.family.timestep_settings(components, num_steps, height, width)
    scheduler.set_timesteps(num_steps, device=components.device, **settings)
    timesteps = scheduler.timesteps
    calls = len(timesteps)
    plans = [GroupPlan.of(group, calls) for group in groups]
    economies = [NegativeEconomy.of(group.guidance) for group in groups]  # None: every planned row computed
    states = [group.guidance.new_state(len(group.seeds)) for group in groups]
    alpha_bars = [float(_alpha_bar(scheduler, t)) for t in timesteps] + [1.0]
    rows_inputs = RowInputs.of(components, height, width)
    _check_conditioning(planned_inputs(groups, plans, calls, rows_inputs), setup.conditioning)
    second_groups = second_expert_groups(groups, scales_2)
    slices = group_slices(groups)
    timestep_values = timesteps.tolist()  # one copy to the host: the hooks, traces and experts read these
    experts = [components.family.expert_at(components, t) for t in timestep_values]
    return LoopSetup(
        setup,
        scheduler,
        timesteps,
        groups,
        second_groups,
        plans,
        economies,
        states,
        alpha_bars,
        rows_inputs,
        slices,
        components.attention_layout,
        experts,
        timestep_values,
    )


def _starting_latents(
    run: LoopSetup, height: int, width: int, frames: int, eta: float
) -> tuple[torch.Tensor, dict[str, Any]]:
    """x_T for every image of the run, (B, C, h, w) (a video's (B, C, F', h, w)), drawn from each image's seeded
    generator, and the keywords ``scheduler.step`` takes (η, those generators for ancestral samplers)."""
    components, scheduler = run.setup.components, run.scheduler
    generators = make_generators([seed for group in run.groups for seed in group.seeds])
    shape = components.family.latent_shape(components, height, width, frames)
    latents = initial_noise(generators, shape, components.dtype).to(components.device)  # equal on every device
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at σ = 1: no scaling
    return latents, _step_keywords(scheduler, eta, generators)


def _evaluate_branches(
    run: LoopSetup,
    groups: Sequence[Group],
    latents: torch.Tensor,
    model_input: torch.Tensor,
    t: torch.Tensor,
    context: StepContext,
) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
    """One step's denoiser calls: each group's planned branches (those its economy computes at this step), groups in
    the same state sharing one call. Returns each group's branch predictions, (B, C, h, w) by branch name, and the
    rows fed to the denoiser (branches × images)."""
    step, calls, rows_inputs, slices = context.step, run.calls, run.rows_inputs, run.slices
    planned = [  # each group's branches (in plan order) with every image's input at this step
        plan.rows[step] if economy is None else economy.rows_at(step, plan.rows[step])
        for plan, economy in zip(run.plans, run.economies)
    ]
    layouts = [layout_at(group, branches, step, calls, rows_inputs) for group, branches in zip(groups, planned)]
    predictions_of: dict[int, dict[str, torch.Tensor]] = {}
    rows = 0
    for sharing in shared_calls(groups, run.plans, layouts, latents, slices):
        g = sharing[0]  # the call holds this group's rows; the others are in the same state
        group, plan = groups[g], run.plans[g]
        contexts = layout_at(group, plan.contexts[step], step, calls, rows_inputs)
        call_context = replace(context, run_state=run.run_states[g]) if plan.alone and run.run_states else context
        predicted = _call_denoiser(
            run.setup, group, layouts[g], contexts, model_input[slices[g]], t, call_context, sharing, plan.alone
        )
        rows += len(group.seeds) * len(layouts[g])
        for member in sharing:
            predictions_of[member] = predicted
    return predictions_of, rows


def _guide_groups(
    run: LoopSetup,
    groups: Sequence[Group],
    predictions_of: Mapping[int, dict[str, torch.Tensor]],
    latents: torch.Tensor,
    model_input: torch.Tensor,
    t: torch.Tensor,
    context: StepContext,
    callback: StepCallback | None,
    trace: list[StepInfo] | None,
) -> torch.Tensor:
    """One step's guidance: each group's predictions (the skipped negatives' stand-ins added) combined by its rule,
    its state updated, and the step shown to ``callback`` and kept in ``trace`` (None: not kept). Returns the guided
    predictions of every image, in group order, (B, C, h, w)."""
    step, scheduler = context.step, run.scheduler
    guided_parts = []
    for g, group in enumerate(groups):
        predictions, state, economy = predictions_of[g], run.states[g], run.economies[g]
        if economy is not None:  # stand-ins for the negatives not computed at this step
            factor = clean_factor(scheduler, model_input[run.slices[g]][:1], t)
            predictions = economy.complete(step, run.plans[g].rows[step], predictions, factor)
        state_before = {k: v.clone() for k, v in state.items()}
        guided = group.guidance.combine(predictions, step, run.calls, state, run.attention_layout)
        group.guidance.update_state(state, predictions, guided, context)
        guided_parts.append(guided)
        if callback is not None or trace is not None:
            part = run.slices[g]
            info = StepInfo(
                step=step,
                num_steps=run.calls,
                timestep=context.timestep,
                latents=latents[part].detach().clone(),
                predictions={k: v.detach().clone() for k, v in predictions.items()},
                guided=guided.detach().clone(),
                denoised=predicted_clean(scheduler, model_input[part], guided, t).detach(),
                group=g,
                guidance_state=state_before,
            )
            if callback is not None:
                callback(info)
            if trace is not None:
                trace.append(_to_cpu(info))
    return guided_parts[0] if len(guided_parts) == 1 else torch.cat(guided_parts)


def _sample_output(run: LoopSetup, latents: torch.Tensor, trace: list[StepInfo] | None, rows: int) -> SampleOutput:
    """The run's result: each group's images decoded apart, as when it runs alone."""
    components = run.setup.components
    return SampleOutput(
        images=np.concatenate([decode(components, latents[part]) for part in run.slices]),
        latents=latents,
        trace=trace,
        unet_batch_rows=rows,
        num_steps=run.calls,
        negative_stops=tuple({} if economy is None else economy.stops() for economy in run.economies),
    )


def _check_rows_per_call(
    groups: Sequence[Group], max_rows_per_call: int | None, unet_hooks: Sequence[UNetCallHook]
) -> None:
    """Calls split in chunks cannot be shown whole to hooks, nor prepared per call by a rule (NAG, VSF)."""
    if max_rows_per_call is None:
        return
    if max_rows_per_call < 1 or unet_hooks:
        raise SamplingError(
            f"max_rows_per_call must be a positive number of rows and cannot be combined with unet_hooks, "
            f"got {max_rows_per_call!r} with {len(unet_hooks)} hook(s)"
        )
    if any(prepares_denoiser(group.guidance) for group in groups):
        raise SamplingError("max_rows_per_call cannot split the calls of a rule that prepares the denoiser (NAG, VSF)")


def _check_conditioning(needed: set[PromptInput], conditioning: Mapping[PromptInput, Conditioning]) -> None:
    """Every input the plans use has its conditioning (made by :func:`encode_groups`)."""
    missing = sorted(needed - set(conditioning), key=input_order)
    if missing:
        raise SamplingError(
            f"no conditioning given for the prompt(s) {', '.join(repr(m.text) for m in missing)}; "
            "encode every prompt of the plan (see encode_groups)"
        )


def _step_keywords(scheduler: Any, eta: float, generators: list[torch.Generator]) -> dict[str, Any]:
    """``scheduler.step``'s keywords it takes of η (DDIM) and the images' generators (ancestral samplers)."""
    parameters = inspect.signature(scheduler.step).parameters
    keywords: dict[str, Any] = {}
    if "eta" in parameters:
        keywords["eta"] = eta
    if "generator" in parameters:
        keywords["generator"] = generators
    return keywords


def _call_denoiser(
    setup: CallSetup,
    group: Group,
    layout: Layout,
    contexts: Layout,
    model_input: torch.Tensor,
    t: torch.Tensor,
    context: StepContext,
    sharing: Sequence[int],
    prepares: bool,
) -> dict[str, torch.Tensor]:
    """One group's UNet call on its images' inputs ``model_input`` (B, C, h, w) by the step's expert
    (``context.expert``): rows branch-major (:func:`~negprompt.sampling.rows.call_rows`), split in chunks of
    ``setup.max_rows_per_call``; with ``prepares``, the rule's ``prepare`` hook is entered around it with each
    branch's inputs and the attention ``contexts``' (NAG, VSF). Hooks are told the layout, with one block per group
    in ``sharing`` (the groups that use this call's result). Returns each branch's prediction, (B, C, h, w)."""
    components, conditioning, expert = setup.components, setup.conditioning, context.expert
    count = len(group.seeds)
    blocks = row_blocks(sharing, layout, count)
    for hook in setup.unet_hooks:
        hook.before_unet_call(context.step, context.timestep, blocks)
    batch, row_conditioning = call_rows(model_input, layout, conditioning)
    chunk = setup.max_rows_per_call or batch.shape[0]
    with ExitStack() as prepared:
        if prepares:  # a rule may prepare the denoiser (e.g. attention processors) with each branch's inputs
            inputs_by_branch = {  # the rows' branches in row order, then the attention contexts
                branch: batched_inputs(setup.batched_inputs, conditioning, items)
                for branch, items in {**layout, **contexts}.items()
            }
            rule, denoiser = group.guidance.rule_object, components.family.denoisers(components)[expert]
            prepared.enter_context(rule.prepare(group.guidance, denoiser, context, inputs_by_branch))
        rows, extra = row_conditioning, setup.guidance_input
        outputs = [
            components.family.denoise(components, batch[i : i + chunk], t, rows[i : i + chunk], extra, expert=expert)
            for i in range(0, batch.shape[0], chunk)
        ]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return split_rows(output, layout, count)


def sample(
    components: Components,
    guidance: Guidance,
    scheduler: Any,
    seeds: Sequence[int],
    num_steps: int,
    height: int,
    width: int,
    callback: StepCallback | None = None,
    keep_trace: bool = False,
    unet_hooks: Sequence[UNetCallHook] = (),
    progress: bool = False,
    eta: float = 0.0,
    conditioning: Mapping[PromptInput, Conditioning] | None = None,
) -> SampleOutput:
    """One group: one image per seed under one guidance (see :func:`sample_groups`); its prompts are
    encoded first by :func:`encode_groups` unless ``conditioning`` is given."""
    groups = [Group(guidance, tuple(int(s) for s in seeds))]
    if conditioning is None:
        conditioning = encode_groups(components, groups, scheduler, num_steps, height, width)
    return sample_groups(
        components,
        groups,
        scheduler,
        num_steps,
        height,
        width,
        callback=callback,
        keep_trace=keep_trace,
        unet_hooks=unet_hooks,
        progress=progress,
        eta=eta,
        conditioning=conditioning,
    )


def _to_cpu(info: StepInfo) -> StepInfo:
    """The same step with its tensors on the CPU (for the kept trace)."""
    predictions = {k: v.cpu() for k, v in info.predictions.items()}
    return replace(
        info,
        latents=info.latents.cpu(),
        predictions=predictions,
        guided=info.guided.cpu(),
        denoised=info.denoised.cpu(),
    )
