"""A family's own reader of its denoiser's text attention: for transformers whose layers the built-in readers
(:mod:`negprompt.layers.attention`: UNet cross-attention, SD3's and FLUX's joint attention) do not cover.

A family whose attention layers differ (FLUX.2's fused single-stream layers, Qwen-Image's complex rotary
positions, Z-Image's single stream with per-row text lengths, Chroma's text masks) gives its
:class:`~negprompt.layers.layout.AttentionLayout` a ``reader``; capture and the rules that act inside attention
then ask the reader, never a class name. Readers live in the family's module (or a module of their own under
``negprompt/layers/``) and use :func:`negprompt.layers.processors.installed` to swap processors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from negprompt.layers.attention import Combine

# (rows of the positive in the call, the negative's denoiser inputs, combine, branch name) → a context manager that
# hands processors installed for a run one call's negative, and clears it on exit
NegativeCaller = Callable[[slice, Mapping[str, Any], Combine, str], AbstractContextManager[None]]


@runtime_checkable
class Recorder(Protocol):
    """What a capture processor reports to (``negprompt.attention.capture.AttentionRecorder`` is one)."""

    @property
    def active(self) -> bool:
        """Whether the current call is recorded (a recorded step and group)."""
        ...

    @property
    def text_length(self) -> int:
        """L: the number of text keys :meth:`record` takes (where a layer's tokens lead with the text, its length)."""
        ...

    def record(self, path: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes one layer's image-query × text-key probabilities (B·heads, N, L): softmax over ALL the layer's
        keys, then the L text keys in the text's own token order (key j = the text's token j as the family's
        ``text_key_segments`` count them; zeros for masked or absent keys), rows in the call's batch order."""
        ...

    def wants_context(self, branch: str) -> bool:
        """Whether the attention on a context recorded as ``branch`` (a negative read inside the positive's pass,
        NAG and VSF; no row of the call) is wanted at the current call."""
        ...

    def record_context(self, path: str, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes one layer's probabilities (B·heads, N, L) of such a context, recorded as ``branch``."""
        ...


@runtime_checkable
class AttentionReader(Protocol):
    """Reads (and for NAG/VSF, changes) a family's text attention. Optional: ``capturing(denoiser)``, a context
    manager that capture enters while the reader's processors are installed (e.g. hooks that read each call's
    row lengths, which a layer's own inputs do not give); ``negative_in_attention_run(denoiser)``, a context manager
    that installs NAG's/VSF's processors (and any forward pre-hooks they read) once for a run and yields a
    :data:`NegativeCaller` (every family's reader has one: Chroma, Wan, FLUX.2 [klein], Qwen-Image, Z-Image; without
    it, :attr:`negative_in_attention` installs them at each call)."""

    def paths(self, denoiser: Any) -> list[str]:
        """Module paths, in the denoiser's order, of the attention layers whose image queries read text keys."""
        ...

    def capture_processor(self, path: str, original: Any, recorder: Recorder) -> Any:
        """A processor for the layer at ``path`` that returns what ``original`` returns and, while
        ``recorder.active``, calls ``recorder.record(path, probabilities, heads)``. It should be an
        :class:`~negprompt.layers.processors.AttentionObserver` (``wants_context``/``observe_context``) if the
        family's negative reader reports the negative's attention to it."""
        ...

    # None: rules acting inside attention (NAG, VSF) are refused on the family.
    negative_in_attention: Callable[[Any, slice, dict[str, Any], Combine, str], AbstractContextManager[None]] | None
    """(denoiser, rows of the positive in the call, the negative's denoiser inputs (``denoiser_inputs``),
    combine, branch name) → a context manager that, for one call, gives the positive's rows ``combine`` of their
    attention over the positive's and the negative's text, and restores the processors on exit."""
