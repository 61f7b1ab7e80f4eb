"""The rows of the denoiser calls: which group's branch each row holds, with which conditioning input,
and which groups share a call.

A run holds one or several :class:`Group`\\ s (one guidance, one image per seed). At each step a
group's branches are its plan's (``Guidance.branches_at``: positive, negatives, unconditional; the
inactive ones are left out). Its call holds its rows branch-major — branch 0 for every image, then
branch 1 … — as when the group runs alone: CPU kernels sum in another order for another batch size,
so a call shared with other images would make an image depend on its neighbours. Groups in the same
state at a step (same seeds, branches, inputs and latents, and no rule that prepares the denoiser)
share one call instead (:func:`shared_calls`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from negprompt.guidance.plan import UNCONDITIONAL, Guidance, MicroConditions
from negprompt.guidance.rules.base import Rule
from negprompt.layers.layout import AttentionLayout
from negprompt.models.components import Components
from negprompt.models.conditioning import Conditioning, PromptInput, denoiser_inputs

Layout = dict[str, tuple[PromptInput, ...]]  # branch → each image's conditioning input, in the call's order


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


@dataclass(frozen=True)
class GroupPlan:
    """A group's branches at every step of a schedule of ``num_calls`` denoiser calls: ``rows[step]`` are
    the denoiser's (in plan order), ``contexts[step]`` those a rule reads inside attention (NAG, VSF).
    ``alone``: the rule prepares the denoiser around its call (e.g. attention processors), so the
    group never shares a call."""

    rows: tuple[tuple[str, ...], ...]
    contexts: tuple[tuple[str, ...], ...]
    alone: bool

    @classmethod
    def of(cls, group: Group, num_calls: int) -> GroupPlan:
        guidance = group.guidance
        return cls(
            tuple(tuple(guidance.branches_at(step, num_calls)) for step in range(num_calls)),
            tuple(tuple(guidance.contexts_at(step, num_calls)) for step in range(num_calls)),
            prepares_denoiser(guidance),
        )

    def needed(self, step: int) -> tuple[str, ...]:
        """Branches whose conditioning ``step`` needs: the rows', then the attention contexts'."""
        return self.rows[step] + self.contexts[step]


def prepares_denoiser(guidance: Guidance) -> bool:
    """Whether the rule prepares the denoiser around each call (its own ``prepare``, e.g. NAG, VSF)."""
    return type(guidance.rule_object).prepare is not Rule.prepare


def second_expert_groups(groups: Sequence[Group], scales_2: Sequence[float | None]) -> list[Group]:
    """The groups with their second experts' scales (their branches unchanged: a scale of 1 on one expert only is
    refused where the run is specified; None keeps a group's scale), or none without any second scale."""
    if all(scale is None for scale in scales_2):
        return []
    assert len(scales_2) == len(groups), "one second scale (or None) per group"
    return [
        group if scale is None else Group(replace(group.guidance, scale=scale), group.seeds)
        for group, scale in zip(groups, scales_2)
    ]


@contextmanager
def rule_scopes(groups: Sequence[Group], denoisers: Sequence[Any], layout: AttentionLayout) -> Iterator[list[Any]]:
    """Each group's rule's run scope (``Rule.run_scope``: e.g. NAG's processors installed once on every denoiser),
    entered in group order for a whole run and left after it (also after an error); yields what each yielded."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(group.guidance.rule_object.run_scope(group.guidance, denoisers, layout))
            for group in groups
        ]


# ---------------------------------------------------------------- conditioning inputs


def branch_inputs(
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


def layout_at(group: Group, branches: Sequence[str], step: int, num_steps: int, rows: RowInputs) -> Layout:
    """The inputs of ``branches`` (in that order) for every image of ``group`` at ``step``."""
    return {branch: branch_inputs(group, branch, step, num_steps, rows) for branch in branches}


def planned_inputs(
    groups: Sequence[Group], plans: Sequence[GroupPlan], num_calls: int, rows: RowInputs | None = None
) -> set[PromptInput]:
    """Every conditioning input the plans' rows and attention contexts use at any step."""
    return {
        item
        for group, plan in zip(groups, plans)
        for step in range(num_calls)
        for branch in plan.needed(step)
        for item in branch_inputs(group, branch, step, num_calls, rows)
    }


def needed_prompts(groups: Sequence[Group], num_calls: int, rows: RowInputs | None = None) -> list[PromptInput]:
    """Every distinct conditioning input the groups' plans evaluate over ``num_calls`` denoiser calls, sorted."""
    plans = [GroupPlan.of(group, num_calls) for group in groups]
    return sorted(planned_inputs(groups, plans, num_calls, rows), key=input_order)


def input_order(item: PromptInput) -> tuple:
    """A sort key of conditioning inputs (text, second text, size conditions, zeros)."""
    return (item.text, item.text_2 or "", item.size_conditions or (), item.zeros_when_empty)


# ---------------------------------------------------------------- calls


def group_slices(groups: Sequence[Group]) -> list[slice]:
    """Each group's images in the run's batch (groups in order, one image per seed)."""
    slices, start = [], 0
    for group in groups:
        slices.append(slice(start, start + len(group.seeds)))
        start += len(group.seeds)
    return slices


def shared_calls(
    groups: Sequence[Group],
    plans: Sequence[GroupPlan],
    layouts: Sequence[Layout],
    latents: torch.Tensor,
    slices: Sequence[slice],
) -> list[list[int]]:
    """The denoiser calls of one step, in order: for each, the groups that use its result, the group
    whose rows it holds first. A later group joins an earlier one's call when both are in the same
    state: same seeds, same branches with the same inputs, equal latents ``latents[slice]`` (B, C, h, w),
    and neither rule prepares the denoiser."""
    calls: list[list[int]] = []
    placed: set[int] = set()
    for g, group in enumerate(groups):
        if g in placed:
            continue
        sharing = [g] + [
            other
            for other in range(g + 1, len(groups))
            if not plans[g].alone
            and not plans[other].alone
            and other not in placed
            and groups[other].seeds == group.seeds
            and list(layouts[other].items()) == list(layouts[g].items())
            and torch.equal(latents[slices[other]], latents[slices[g]])
        ]
        placed.update(sharing)
        calls.append(sharing)
    return calls


def row_blocks(sharing: Sequence[int], layout: Layout, count: int) -> list[RowBlock]:
    """The blocks of a call holding ``layout``'s branches for ``count`` images, named once per group in
    ``sharing`` (each sees the same rows)."""
    return [
        RowBlock(member, branch, b * count, (b + 1) * count) for member in sharing for b, branch in enumerate(layout)
    ]


def call_rows(
    model_input: torch.Tensor, layout: Layout, conditioning: Mapping[PromptInput, Conditioning]
) -> tuple[torch.Tensor, list[Conditioning]]:
    """A call's batch: the images' inputs (B, C, h, w) repeated once per branch → (branches·B, C, h, w),
    and each row's conditioning, branch-major."""
    batch = model_input.repeat(len(layout), *([1] * (model_input.dim() - 1)))
    return batch, [conditioning[item] for items in layout.values() for item in items]


def batched_inputs(
    made: dict[tuple[PromptInput, ...], dict[str, Any]],
    conditioning: Mapping[PromptInput, Conditioning],
    items: tuple[PromptInput, ...],
) -> dict[str, Any]:
    """``denoiser_inputs`` of rows conditioned on ``items``, made once per run and kept in ``made``: the same
    tensors at every call (a rule's run state may key what it computes of them by the tensor, e.g. the keys and
    values of NAG's negative)."""
    inputs = made.get(items)
    if inputs is None:
        inputs = made[items] = denoiser_inputs([conditioning[item] for item in items])
    return inputs


def split_rows(output: torch.Tensor, layout: Layout, count: int) -> dict[str, torch.Tensor]:
    """A call's output (branches·B, C, h, w) → each branch's prediction (B, C, h, w)."""
    return {branch: output[b * count : (b + 1) * count] for b, branch in enumerate(layout)}


__all__ = [
    "Group",
    "GroupPlan",
    "Layout",
    "RowBlock",
    "RowInputs",
    "batched_inputs",
    "branch_inputs",
    "call_rows",
    "group_slices",
    "input_order",
    "layout_at",
    "needed_prompts",
    "planned_inputs",
    "prepares_denoiser",
    "row_blocks",
    "rule_scopes",
    "second_expert_groups",
    "shared_calls",
    "split_rows",
]
