"""The one denoising loop of negprompt.

Each step evaluates every branch the guidance needs at that step in one batched denoiser call per group
of images (groups in the same state share it), combines the branch predictions with the guidance
rule and advances the scheduler. A group's call is laid out as when the group runs alone, so its
images are bit-identical whatever else runs beside it. Branches are named
(``positive``, ``negative``, ``unconditional`` …), never found by their position in the batch.

The loop encodes no prompt: it is given each prompt text's encoded
:class:`~negprompt.models.conditioning.Conditioning` (made beforehand by the model family's adapter,
see :func:`encode_groups`) and hands them, batched, to the family's ``denoise``, which calls the
denoiser as the family's pipeline does (a UNet with any added inputs; SD3's and FLUX's transformers,
FLUX on packed latents). The family also sets the scheduler's timesteps; a flow-matching scheduler
(SD3, FLUX) makes the predictions velocities, and rules not exact on them are refused before the
first step. (``UNet`` in names here means the denoiser, whichever it is.)

Observers see each step through a read-only :class:`StepInfo`; a ``UNetCallHook`` is told, before
each denoiser call, which step it is and how the batch is laid out (attention capture uses this).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from negprompt.errors import NegpromptError
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, MicroConditions, StepContext
from negprompt.guidance.rules.base import Rule
from negprompt.limits import MAX_STEPS
from negprompt.models.components import Components
from negprompt.models.conditioning import Conditioning, PromptInput, denoiser_inputs
from negprompt.models.family import EmbeddedGuidanceError
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
    """Decoded images (B, H, W, 3) float32 in [0, 1], the final latents and, on request, the trace."""

    images: np.ndarray
    latents: torch.Tensor
    trace: list[StepInfo] | None
    unet_batch_rows: int  # Σ over steps of the rows fed to the UNet (branches × images)
    num_steps: int  # UNet calls (len of the scheduler's timesteps)


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


def decode(components: Components, latents: torch.Tensor) -> np.ndarray:
    """Latents (B, C, h, w) → images (B, H, W, 3) float32 in [0, 1], by the model family's adapter."""
    return components.family.decode(components, latents)


@dataclass(frozen=True)
class Group:
    """Images that share one guidance: one image per seed. A run may hold several groups."""

    guidance: Guidance
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of a UNet call hold the prediction of ``branch`` for the images of ``group``.

    Two groups whose images are in the same state (same seeds, latents, branches and prompts) share
    a call: its blocks name both groups.
    """

    group: int
    branch: str
    start: int
    stop: int


def _validate_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
        raise SamplingError(f"steps must be an integer in 1–{MAX_STEPS}, got {num_steps!r}")


def _validate(components: Components, groups: Sequence[Group], num_steps: int, height: int, width: int) -> None:
    """Checks steps, seeds and image size; raises :class:`SamplingError`."""
    _validate_steps(num_steps)
    if not groups or any(not group.seeds for group in groups):
        raise SamplingError("give at least one seed")
    multiple = components.size_multiple
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise SamplingError(f"{name} {value} is not a positive multiple of {multiple} (the model's size factor)")


@dataclass(frozen=True)
class RowInputs:
    """What, besides the prompt texts, decides a row's conditioning in this run: the image size and
    what the model family conditions on (see :class:`~negprompt.models.conditioning.PromptInput`)."""

    height: int
    width: int
    size_conditioned: bool = False  # SDXL: micro-conditions (time ids) per row
    zeros_when_empty: bool = False  # SDXL's force_zeros_for_empty_prompt, for negative and ∅ rows

    @classmethod
    def of(cls, components: Components, height: int | None = None, width: int | None = None) -> RowInputs:
        family, side = components.family, components.default_size
        return cls(
            side if height is None else height,
            side if width is None else width,
            family.size_conditioned,
            family.zeros_empty_negatives(components),
        )


def _branch_prompts(
    group: Group, branch: str, step: int, num_steps: int, rows: RowInputs | None = None
) -> tuple[PromptInput, ...]:
    """Each image's conditioning input for ``branch`` at ``step`` (AUTOMATIC1111 prompt edits applied)."""
    count = len(group.seeds)
    rows = rows or RowInputs(0, 0)
    positive = group.guidance.positive
    if branch == UNCONDITIONAL:
        texts, seconds, micro = [""] * count, [None] * count, None  # ∅ keeps the positive's size conditions
    else:
        term = group.guidance.terms[branch]
        texts, seconds = term.texts_at(step, num_steps, count), term.second_texts_at(step, num_steps, count)
        micro = term.micro if term is not positive else None
    size = None
    if rows.size_conditioned:  # a negative's own micro-conditions, each missing one the positive's
        own = micro or positive.micro or MicroConditions()
        size = own.resolve(rows.height, rows.width, positive.micro if micro else None)
    zeros = rows.zeros_when_empty and not branch.startswith("positive")
    return tuple(PromptInput(t, s, size, zeros) for t, s in zip(texts, seconds))


def _plan_texts(
    groups: Sequence[Group], plans: Sequence[Sequence[Sequence[str]]], calls: int, rows: RowInputs | None = None
) -> set[PromptInput]:
    """Conditioning inputs of the branches ``plans[g][step]`` evaluates."""
    return {
        t
        for g, group in enumerate(groups)
        for step, branches in enumerate(plans[g])
        for b in branches
        for t in _branch_prompts(group, b, step, calls, rows)
    }


def needed_prompts(groups: Sequence[Group], num_calls: int, rows: RowInputs | None = None) -> list[PromptInput]:
    """Every distinct conditioning input the groups' plans evaluate over ``num_calls`` denoiser calls, sorted."""
    for group in groups:
        group.guidance.validate(num_calls)
    plans = [[_needed_branches(group, step, num_calls) for step in range(num_calls)] for group in groups]
    return sorted(_plan_texts(groups, plans, num_calls, rows), key=_input_order)


def _needed_branches(group: Group, step: int, num_steps: int) -> list[str]:
    """Branches whose conditioning a step needs: the denoiser's rows and the rule's attention contexts."""
    guidance = group.guidance
    return guidance.branches_at(step, num_steps) + guidance.contexts_at(step, num_steps)


def _input_order(item: PromptInput) -> tuple:
    return (item.text, item.text_2 or "", item.size_conditions or (), item.zeros_when_empty)


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
    image's conditioning never depends on its batch)."""
    _validate_steps(num_steps)
    calls = denoiser_calls("default", scheduler, num_steps)
    return components.family.encode(components, needed_prompts(groups, calls, RowInputs.of(components, height, width)))


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
) -> SampleOutput:
    """The denoising loop for several groups of images at once, one batched UNet call per group and step.

    ``conditioning`` maps every prompt text the plans evaluate to its encoded conditioning (see
    :func:`encode_groups`); the UNet gets them batched as ``encoder_hidden_states`` and, when the
    family provides them, ``added_cond_kwargs``.

    Each group's call holds only its own rows, in the order it has when run alone: CPU kernels sum
    in another order for another batch size (one level in one pixel), so a shared call would make an
    image depend on its neighbours. Groups in the same state at a step (e.g. a delayed negative
    before its window opens and the plain run) share one call.

    ``max_rows_per_call`` splits each call into chunks of at most so many rows: the images agree up
    to float rounding (measured ≤ 2e-5), and on a CPU very large batches cost more per row. It is
    a setting to record with the output (``RunSpec.rows_per_call``), and cannot be combined with
    ``unet_hooks``, which see whole calls.

    ``embedded_guidance``: the guidance scale w given to a guidance-distilled UNet (one whose config
    has ``time_cond_proj_dim``) with every row, as ``timestep_cond``; such a UNet needs it, others
    refuse it.

    All groups share the schedule. Images come out in group order. ``scheduler`` is consumed (its
    state advances); pass a fresh one per call. ``num_steps`` is given to ``scheduler.set_timesteps``;
    the loop runs one UNet call per entry of ``scheduler.timesteps`` and windows count those calls.
    """
    _validate(components, groups, num_steps, height, width)
    if max_rows_per_call is not None and (max_rows_per_call < 1 or unet_hooks):
        raise SamplingError(
            f"max_rows_per_call must be a positive number of rows and cannot be combined with unet_hooks, "
            f"got {max_rows_per_call!r} with {len(unet_hooks)} hook(s)"
        )
    if max_rows_per_call is not None and any(
        type(group.guidance.rule_object).prepare is not Rule.prepare for group in groups
    ):
        raise SamplingError("max_rows_per_call cannot split the calls of a rule that prepares the denoiser (NAG, VSF)")
    device, dtype = components.device, components.dtype
    family = components.family
    try:
        guidance_input = family.guidance_inputs(components, embedded_guidance)
    except EmbeddedGuidanceError as error:
        raise SamplingError(str(error)) from None
    for group in groups:
        group.guidance.rule_object.check_prediction(prediction_type(scheduler))
    scheduler.set_timesteps(num_steps, device=device, **family.timestep_settings(components, num_steps, height, width))
    timesteps = scheduler.timesteps
    calls = len(timesteps)
    for group in groups:
        group.guidance.validate(calls)
    plans = [[group.guidance.branches_at(step, calls) for step in range(calls)] for group in groups]
    contexts = [[group.guidance.contexts_at(step, calls) for step in range(calls)] for group in groups]
    states = [group.guidance.new_state(len(group.seeds)) for group in groups]
    alpha_bars = [float(_alpha_bar(scheduler, t)) for t in timesteps] + [1.0]

    rows_inputs = RowInputs.of(components, height, width)
    needed = [[rows_of + extra for rows_of, extra in zip(p, c)] for p, c in zip(plans, contexts)]
    missing = sorted(_plan_texts(groups, needed, calls, rows_inputs) - set(conditioning), key=_input_order)
    if missing:
        raise SamplingError(
            f"no conditioning given for the prompt(s) {', '.join(repr(m.text) for m in missing)}; "
            "encode every prompt of the plan (see encode_groups)"
        )

    slices, start = [], 0
    for group in groups:
        slices.append(slice(start, start + len(group.seeds)))
        start += len(group.seeds)
    seeds = [seed for group in groups for seed in group.seeds]
    generators = make_generators(seeds)
    shape = components.family.latent_shape(components, height, width)
    latents = initial_noise(generators, shape, dtype).to(device)  # drawn on the CPU: equal on every device
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at σ = 1: no scaling

    step_parameters = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_parameters:
        step_kwargs["eta"] = eta
    if "generator" in step_parameters:
        step_kwargs["generator"] = generators

    trace: list[StepInfo] | None = [] if keep_trace else None
    # Rules that prepare the denoiser (e.g. attention processors) never share a call with another group.
    prepares_denoiser = [type(group.guidance.rule_object).prepare is not Rule.prepare for group in groups]
    rows = 0
    for step, t in enumerate(tqdm(timesteps, disable=not progress, unit="step", leave=False)):
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        context = StepContext(step, calls, alpha_bars[step], alpha_bars[step + 1])
        predictions_of: dict[int, dict[str, torch.Tensor]] = {}
        # Each group's branches (in plan order) with every image's prompt at this step.
        layouts = [
            {branch: _branch_prompts(group, branch, step, calls, rows_inputs) for branch in plans[g][step]}
            for g, group in enumerate(groups)
        ]
        # One UNet call per group (its rows branch-major, as when it runs alone), so an image never
        # depends on the other groups of the run; groups in the same state share one call.
        for g, group in enumerate(groups):
            if g in predictions_of:
                continue  # shares the call of an earlier group
            prepares = prepares_denoiser[g]
            sharing = [g] + [
                other
                for other in range(g + 1, len(groups))
                if not prepares
                and not prepares_denoiser[other]
                and other not in predictions_of
                and groups[other].seeds == group.seeds
                and list(layouts[other].items()) == list(layouts[g].items())
                and torch.equal(latents[slices[other]], latents[slices[g]])
            ]
            predicted = _call_denoiser(
                components,
                group,
                layouts[g],
                {branch: _branch_prompts(group, branch, step, calls, rows_inputs) for branch in contexts[g][step]},
                model_input[slices[g]],
                t,
                step,
                context,
                sharing,
                conditioning,
                unet_hooks,
                max_rows_per_call,
                prepares,
                guidance_input,
            )
            rows += len(group.seeds) * len(layouts[g])
            for member in sharing:
                predictions_of[member] = predicted

        guided_parts = []
        for g, group in enumerate(groups):
            predictions = predictions_of[g]
            state_before = {k: v.clone() for k, v in states[g].items()}
            guided = group.guidance.combine(predictions, step, calls, states[g])
            group.guidance.update_state(states[g], predictions, guided, context)
            guided_parts.append(guided)
            if callback is not None or trace is not None:
                info = StepInfo(
                    step=step,
                    num_steps=calls,
                    timestep=float(t),
                    latents=latents[slices[g]].detach().clone(),
                    predictions={k: v.detach().clone() for k, v in predictions.items()},
                    guided=guided.detach().clone(),
                    denoised=predicted_clean(scheduler, model_input[slices[g]], guided, t).detach(),
                    group=g,
                    guidance_state=state_before,
                )
                if callback is not None:
                    callback(info)
                if trace is not None:
                    trace.append(_to_cpu(info))
        guided_all = guided_parts[0] if len(guided_parts) == 1 else torch.cat(guided_parts)
        latents = scheduler.step(guided_all, t, latents, **step_kwargs, return_dict=False)[0]

    return SampleOutput(
        images=np.concatenate([decode(components, latents[part]) for part in slices]),  # per group, as alone
        latents=latents,
        trace=trace,
        unet_batch_rows=rows,
        num_steps=calls,
    )


def _call_denoiser(
    components: Components,
    group: Group,
    prompts: Mapping[str, tuple[PromptInput, ...]],
    context_prompts: Mapping[str, tuple[PromptInput, ...]],
    model_input: torch.Tensor,
    t: torch.Tensor,
    step: int,
    context: StepContext,
    sharing: Sequence[int],
    conditioning: Mapping[PromptInput, Conditioning],
    unet_hooks: Sequence[UNetCallHook],
    max_rows_per_call: int | None,
    prepares: bool,
    guidance_input: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One group's UNet call: rows branch-major (branch 0 for every image, then branch 1 …), split in
    chunks of ``max_rows_per_call``; the rule's ``prepare`` hook is entered around it. Hooks are told
    the layout, with one block per group in ``sharing`` (the groups that use this call's result).
    Returns each branch's prediction, (B, C, h, w)."""
    count = len(group.seeds)
    blocks = [
        RowBlock(member, branch, b * count, (b + 1) * count) for member in sharing for b, branch in enumerate(prompts)
    ]
    for hook in unet_hooks:
        hook.before_unet_call(step, float(t), blocks)
    batch = model_input.repeat(len(prompts), *([1] * (model_input.dim() - 1)))
    row_conditioning = [conditioning[text] for texts in prompts.values() for text in texts]
    chunk = max_rows_per_call or batch.shape[0]
    with ExitStack() as prepared:
        if prepares:  # a rule may prepare the denoiser (e.g. attention processors) with each branch's inputs
            branch_inputs = {  # the rows' branches in row order, then the attention contexts
                branch: denoiser_inputs([conditioning[text] for text in texts])
                for branch, texts in {**prompts, **context_prompts}.items()
            }
            rule = group.guidance.rule_object
            prepared.enter_context(rule.prepare(group.guidance, components.denoiser, context, branch_inputs))
        outputs = [
            components.family.denoise(
                components, batch[i : i + chunk], t, row_conditioning[i : i + chunk], guidance_input
            )
            for i in range(0, batch.shape[0], chunk)
        ]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return {branch: output[b * count : (b + 1) * count] for b, branch in enumerate(prompts)}


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
    return StepInfo(
        step=info.step,
        num_steps=info.num_steps,
        timestep=info.timestep,
        latents=info.latents.cpu(),
        predictions={k: v.cpu() for k, v in info.predictions.items()},
        guided=info.guided.cpu(),
        denoised=info.denoised.cpu(),
        group=info.group,
        guidance_state=info.guidance_state,
    )
