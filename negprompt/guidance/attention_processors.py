"""Attention processors for rules whose negative acts inside attention (NAG, VSF), installed once per run.

:func:`negative_attention_run` installs on every layer with text keys of each denoiser of a run (keyed by module
path, through :func:`negprompt.layers.processors.installed`) a processor that, at the calls the rule hands it
parameters (:meth:`NegativeAttentionRun.call`: the positive's rows, the negative, the rule's combination),
recomputes the positive branch's rows with the rule's combination of the positive's and the negative's attention,
and passes every other call through; the layers' processors are restored when the run ends, also after an error.
:func:`negative_in_attention` does the same for one call. Which processor depends on the family's
:class:`~negprompt.layers.layout.AttentionLayout`:

- ``"cross"`` (UNets): :class:`NegativeAttentionProcessor` — the negative is a second text context
  of each cross-attention layer;
- ``"joint"`` (SD3, FLUX): :mod:`negprompt.layers.joint_negative` — the negative runs as a text stream of its own
  through the blocks;
- a family's own reader (``layout.reader``): once per run through its ``negative_in_attention_run`` (Chroma,
  FLUX.2 klein, Qwen-Image, Z-Image, Wan; a reader without one installs per call), through the same
  :meth:`NegativeAttentionRun.call`.

Other rows (e.g. ∅ rows of a CFG run) go through the layer's own processor unchanged. Everything
but the combination is computed as the layers' own processors compute it
(:mod:`negprompt.layers.attention`), so only the rule's formula differs. Imports torch: rules
import this module in ``run_scope`` and ``prepare`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from negprompt.guidance import formulas
from negprompt.layers.attention import (
    Combine,
    KeysValues,
    attention_and_logsumexp,
    cross_attention_output,
    cross_attention_probabilities,
    cross_keys_values,
    is_cross_attention,
    join_tokens,
    merge_attention,
    merge_heads,
)
from negprompt.layers.layout import AttentionLayout
from negprompt.layers.processors import CallSlot, PerNegative, installed, observer_of
from negprompt.layers.readers import NegativeCaller


def nag_combine(phi: float, tau: float, alpha: float) -> Combine:
    """Z⁺ over the positive's keys and Z⁻ over the negative's (each with the image keys in a joint
    layer), then :func:`negprompt.guidance.formulas.nag`: one attention call over both, or, in a joint layer
    with more image keys than text keys, the image keys' part once and each text's part merged with it
    (tiny FLUX at 256²: NAG / plain 1.60 → 1.14)."""

    def combine(query, text, negative, image=None, text_bias=None):
        if image is not None and image[0].shape[2] > text[0].shape[2]:  # mostly image keys: attend to them once
            return formulas.nag(*_joint_attentions(query, text, negative, image, text_bias), phi, tau, alpha)
        bias = None
        if text_bias is not None:  # (2B, 1, 1, L [+ M]): the positive's rows, then the negative's
            bias = torch.cat([_with_image_keys(b, image) for b in text_bias])[:, None, None, :]
        if image is not None:  # few image keys (a small image): one call over [text; image] for both
            text, negative = join_tokens(text, image), join_tokens(negative, image)
        both = F.scaled_dot_product_attention(
            torch.cat([query, query]),
            torch.cat([text[0], negative[0]]),
            torch.cat([text[1], negative[1]]),
            attn_mask=None if bias is None else bias.to(query.dtype),
        )
        positive, negative_out = merge_heads(both).chunk(2)
        return formulas.nag(positive, negative_out, phi, tau, alpha)

    return combine


def _joint_attentions(
    query: torch.Tensor,
    text: KeysValues,
    negative: KeysValues,
    image: KeysValues,
    text_bias: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Z⁺ over [positive text; image] keys and Z⁻ over [negative text; image] (B, Q, H·d) for image queries
    (B, H, Q, d): the attention over the image keys computed once, each text's part beside it (both texts in one
    call), merged by their log-sum-exps (:func:`negprompt.layers.attention.merge_attention`). The image keys are
    most keys of a joint layer (4096 image tokens beside 512 text tokens at 1024²): attending to them twice would
    double the layer's work."""
    batch = query.shape[0]
    image_part = attention_and_logsumexp(query, *image)
    bias = None
    if text_bias is not None:  # (2B, 1, 1, L): the positive's rows, then the negative's
        bias = torch.cat([b.float() for b in text_bias])[:, None, None, :]
    out, lse = attention_and_logsumexp(
        torch.cat([query, query]), torch.cat([text[0], negative[0]]), torch.cat([text[1], negative[1]]), bias
    )
    positive = merge_attention([image_part, (out[:batch], lse[:batch])])
    negative_out = merge_attention([image_part, (out[batch:], lse[batch:])])
    return merge_heads(positive), merge_heads(negative_out)


def vsf_combine(scale: float, offset: float, start_tokens: int) -> Combine:
    """:func:`negprompt.guidance.formulas.vsf_attention`: the negative's text keys appended to the
    positive's (and the image keys, in a joint layer) with their values' sign flipped; its first
    ``start_tokens`` tokens (CLIP's start token, the attention sink) left out."""

    def combine(query, text, negative, image=None, text_bias=None):
        keys, values = text if image is None else join_tokens(text, image)
        bias = None
        if text_bias is not None:
            positive_bias = _with_image_keys(text_bias[0], image)
            bias = torch.cat([positive_bias, text_bias[1][:, start_tokens:].float()], dim=1)[:, None, None, :]
        z = formulas.vsf_attention(
            query,
            keys,
            values,
            negative[0][:, :, start_tokens:],
            negative[1][:, :, start_tokens:],
            scale,
            offset,
            key_bias=bias,
        )
        return merge_heads(z)

    return combine


def _with_image_keys(text_bias: torch.Tensor, image: Any) -> torch.Tensor:
    """Logit offsets (B, L [+ M]) of [text; image] keys: the text keys' ``text_bias`` (B, L), then 0 for the M
    image keys of a joint layer (``image``: its keys and values, or None)."""
    if image is None:
        return text_bias.float()
    return torch.cat([text_bias.float(), text_bias.new_zeros(text_bias.shape[0], image[0].shape[2]).float()], dim=1)


@dataclass(frozen=True)
class NegativeCall:
    """One denoiser call's negative inside a cross-attention layer: the positive's rows ``rows`` of the call,
    the negative's text states (B, L⁻, D), the rule's combination, the negative's branch name (for observers);
    ``keys_values``: the run's cache of the negative's keys and values by layer (None: computed at each call)."""

    rows: slice
    negative: torch.Tensor
    combine: Combine
    branch: str = "negative"
    keys_values: dict[int, KeysValues] | None = None


class NegativeAttentionProcessor:
    """A cross-attention layer's processor: the rows of the current call's :class:`NegativeCall` (the positive
    branch's) are recomputed with its ``combine`` and negative context; others go through ``original``, and so do
    all rows while ``slot`` holds no call (a run's other groups, steps outside the negative's window).

    Installed once per run with the run's ``slot``, or, given ``rows``, ``negative`` and ``combine``, for those
    fixed parameters. An ``original`` that observes attention (:class:`~negprompt.layers.processors.AttentionObserver`,
    e.g. attention capture) still sees the whole batch, and is given the positive rows' attention on the negative
    as the call's branch.
    """

    def __init__(
        self,
        original: Any,
        rows: slice | None = None,
        negative: torch.Tensor | None = None,
        combine: Combine | None = None,
        branch: str = "negative",
        *,
        slot: CallSlot | None = None,
    ) -> None:
        self.original = original
        self.slot = slot if slot is not None else CallSlot(NegativeCall(rows, negative, combine, branch))
        self.observer = observer_of(original)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call: NegativeCall | None = self.slot.current
        if call is None or encoder_hidden_states is None or attention_mask is not None:  # nothing to do here
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows, whole = call.rows, call.rows == slice(0, hidden_states.shape[0])
        image, text = hidden_states[rows], encoder_hidden_states[rows]
        negative_keys_values = _negative_keys_values(attn, call)

        def attend(query: torch.Tensor) -> torch.Tensor:
            return call.combine(query, cross_keys_values(attn, text), negative_keys_values, None)

        guided = cross_attention_output(attn, image, attend, None if temb is None else temb[rows])
        if self.observer is not None and self.observer.wants_context(call.branch):
            probabilities = cross_attention_probabilities(attn, image, call.negative)
            self.observer.observe_context(call.branch, probabilities, attn.heads)
        if whole and self.observer is None:  # one pass per step (scale 1): only the positive's rows
            return guided
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        out = out.clone()
        out[rows] = guided
        return out


def _negative_keys_values(attn: Any, call: NegativeCall) -> KeysValues:
    """The negative's keys and values in layer ``attn`` (each (B, H, L⁻, d)): from the run's cache when the call
    has one (the same negative tensor at every call of its inputs: computed once per run), else computed."""
    if call.keys_values is None:
        return cross_keys_values(attn, call.negative)
    cached = call.keys_values.get(id(attn))
    if cached is None:
        cached = call.keys_values[id(attn)] = cross_keys_values(attn, call.negative)
    return cached


class NegativeAttentionRun:
    """NAG's or VSF's processors installed once for a run on each denoiser (:func:`negative_attention_run`); each
    denoiser call hands them its parameters through :meth:`call`. A family's own reader (``layout.reader``) installs
    for the run through its ``negative_in_attention_run`` (every built-in family's; a reader without one installs per
    call), through the same :meth:`call`.

    The negative's keys and values (UNets) and its text stream's start (MMDiTs: ``context_embedder`` of its
    states) are computed once per run for each negative tensor: the loop hands the same tensor for the same
    inputs at every call (:class:`negprompt.sampling.loop.LoopSetup`), so the cache holds one entry per
    distinct negative (a prompt edited at a step gives a second)."""

    def __init__(self, layout: AttentionLayout) -> None:
        self.layout = layout
        self.callers: dict[int, NegativeCaller] = {}  # id(denoiser) → what hands its installed processors a call
        self._cache_of = PerNegative(lambda negative: {})  # each negative's keys and values, by layer

    def install(self, stack: ExitStack, denoiser: Any) -> None:
        """Installs the processors on ``denoiser`` for as long as ``stack`` holds (a reader without
        ``negative_in_attention_run``: nothing, it installs per call)."""
        reader = self.layout.reader
        if reader is not None:
            run_of = getattr(reader, "negative_in_attention_run", None)
            if run_of is not None:
                self.callers[id(denoiser)] = stack.enter_context(run_of(denoiser))
            return
        if self.layout.kind == "joint":
            from negprompt.guidance.joint_attention_processors import joint_attention_run

            self.callers[id(denoiser)] = stack.enter_context(joint_attention_run(denoiser))
            return
        slot = CallSlot()
        reads_text = {"cross": is_cross_attention}.get(self.layout.kind)

        def make(path: str, original: Any) -> Any:
            if reads_text is None or not reads_text(denoiser.get_submodule(path)):
                return None
            return NegativeAttentionProcessor(original, slot=slot)

        stack.enter_context(installed(denoiser, make))

        def call(rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str) -> Any:
            negative = negative_inputs["encoder_hidden_states"]
            return slot.holding(NegativeCall(rows, negative, combine, branch, self._cache_of(negative)))

        self.callers[id(denoiser)] = call

    @contextmanager
    def call(
        self, denoiser: Any, rows: slice, negative_inputs: Mapping[str, Any], combine: Combine, branch: str
    ) -> Iterator[None]:
        """For one call of ``denoiser``, the positive's rows ``rows`` read the negative (its denoiser inputs,
        ``encoder_hidden_states`` (B, L⁻, D)) combined by ``combine``; the processors pass through again on exit."""
        caller = self.callers.get(id(denoiser))
        if caller is None:  # a family's reader that installs per call, or a denoiser not installed for the run
            with negative_in_attention(denoiser, self.layout, rows, negative_inputs, combine, branch):
                yield
            return
        with caller(rows, negative_inputs, combine, branch):
            yield


@contextmanager
def negative_attention_run(denoisers: Sequence[Any], layout: AttentionLayout) -> Iterator[NegativeAttentionRun]:
    """Installs NAG's or VSF's processors once on every denoiser of a run (Wan 2.2 has two), passing through until
    a call hands them its parameters (:meth:`NegativeAttentionRun.call`); restores the processors found on exit
    (also on error). Processors installed before (attention capture's observers) are wrapped."""
    run = NegativeAttentionRun(layout)
    with ExitStack() as stack:
        for denoiser in denoisers:
            run.install(stack, denoiser)
        yield run


@contextmanager
def negative_in_attention(
    denoiser: Any,
    layout: AttentionLayout,
    rows: slice,
    negative_inputs: Mapping[str, Any],
    combine: Combine,
    branch: str = "negative",
) -> Iterator[None]:
    """For one call, the positive's rows ``rows`` read the negative's text states (``negative_inputs``: the
    negative's denoiser inputs, :func:`negprompt.models.conditioning.denoiser_inputs`; its
    ``encoder_hidden_states`` (B, L⁻, D)) inside every layer with text keys, combined by ``combine``; the
    processors found are restored on exit (also on error). A family's own reader (``layout.reader``) does it
    on layers the built-in readers do not cover. (A run installs once: :func:`negative_attention_run`.)"""
    if layout.reader is not None:
        with layout.reader.negative_in_attention(denoiser, rows, dict(negative_inputs), combine, branch):
            yield
        return
    with negative_attention_run([denoiser], layout) as run, run.call(denoiser, rows, negative_inputs, combine, branch):
        yield
