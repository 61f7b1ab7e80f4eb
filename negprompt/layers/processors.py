"""Installing attention processors on a denoiser, keyed by module path, and restoring them.

:func:`installed` is the one way negprompt swaps processors: for a run (attention capture) or for
one denoiser call (NAG, VSF), always restoring the processors it found on exit, also after an error.
Swaps nest: a processor installed later wraps the one it found (its ``original``).

Two kinds of processor meet when a capture runs a rule that acts inside attention: the rule's
processor replaces the layer's attention for the positive's rows and reads a negative that is no
row of the call; the capture's processor observes. They compose through :class:`AttentionObserver`:
a replacing processor whose ``original`` is an observer still calls it on the whole batch (so the
observer sees every row as without the rule) and reports the negative's attention to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch

# (module path, the processor found there) → the processor to install, or None to keep the one found
MakeProcessor = Callable[[str, Any], Any]


@runtime_checkable
class AttentionObserver(Protocol):
    """A processor that records attention and accepts what a processor wrapping it reads besides the
    call's rows (a negative inside the positive's pass, NAG and VSF)."""

    def wants_context(self, branch: str) -> bool:
        """Whether the attention on a context recorded as ``branch`` is wanted at this call."""
        ...

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes the layer's probabilities (B·heads, Q, L) of the context recorded as ``branch``."""
        ...


def observer_of(processor: Any) -> AttentionObserver | None:
    """``processor`` if it observes attention, else None."""
    return processor if isinstance(processor, AttentionObserver) else None


@contextmanager
def installed(denoiser: Any, make: MakeProcessor) -> Iterator[None]:
    """Installs ``make(path, original)`` on every attention layer of ``denoiser`` (``path``: the layer's
    module path, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``) where it returns a
    processor; restores the processors found on exit (also on error)."""
    originals = processors_of(denoiser)
    replacement = {}
    for key, original in originals.items():
        made = make(key.removesuffix(".processor"), original)
        replacement[key] = original if made is None else made
    set_processors(denoiser, replacement)
    try:
        yield
    finally:
        set_processors(denoiser, originals)


def processors_of(denoiser: Any) -> dict[str, Any]:
    """Every attention layer's processor, keyed ``<module path>.processor``: diffusers' ``attn_processors``, or,
    for a model without diffusers' attention mixin (Z-Image's transformer), each module's with ``set_processor``."""
    if hasattr(denoiser, "attn_processors"):
        return dict(denoiser.attn_processors)
    return {
        f"{path}.processor": module.processor
        for path, module in denoiser.named_modules()
        if hasattr(module, "set_processor") and hasattr(module, "processor")
    }


def set_processors(denoiser: Any, processors: dict[str, Any]) -> None:
    """Sets the processors :func:`processors_of` returns (every layer's)."""
    if hasattr(denoiser, "set_attn_processor"):
        denoiser.set_attn_processor(processors)
        return
    for key, processor in processors.items():
        denoiser.get_submodule(key.removesuffix(".processor")).set_processor(processor)
