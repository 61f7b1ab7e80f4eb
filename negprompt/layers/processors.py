"""Installing attention processors on a denoiser, keyed by module path, and restoring them.

:func:`installed` is the one way negprompt swaps processors: for a run (attention capture; NAG and VSF, whose
processors each call hands its parameters through a :class:`CallSlot`), always restoring the processors it found
on exit, also after an error.
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
    """``processor`` if it observes attention; for a processor installed for a run (one holding a :class:`CallSlot`:
    it passes the calls of other groups through to the processor it wraps), the observer it found below itself;
    else None. (What ``isinstance`` of the runtime-checkable protocol asks, without its slow path.)"""
    if isinstance(getattr(processor, "slot", None), CallSlot):  # e.g. another group's NAG processor over capture's
        return processor.observer
    observes = all(callable(getattr(processor, name, None)) for name in ("wants_context", "observe_context"))
    return processor if observes else None


@contextmanager
def installed(denoiser: Any, make: MakeProcessor) -> Iterator[None]:
    """Installs ``make(path, original)`` on every attention layer of ``denoiser`` (``path``: the layer's
    module path, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``) where it returns a
    processor; restores the processors found on exit (also on error).

    One walk of the module tree, and only the layers that change are set, each on its own module: no
    model-wide ``set_attn_processor``, which walks the tree twice (docs/gpu-cost.md)."""
    swapped: list[tuple[Any, Any]] = []
    try:
        for path, layer in attention_layers(denoiser):
            original = _processor(layer)
            made = make(path, original)
            if made is not None:
                layer.set_processor(made)
                swapped.append((layer, original))
        yield
    finally:
        for layer, original in reversed(swapped):
            layer.set_processor(original)


class CallSlot:
    """What the current denoiser call hands processors installed once for a whole run (NAG's, VSF's): the call's
    parameters, or None between calls and on calls that do not use them (the processors then pass through to the
    one they wrap). Owned by the run's scope, shared by its processors: no state outside the run."""

    __slots__ = ("current",)

    def __init__(self, current: Any = None) -> None:
        self.current = current

    @contextmanager
    def holding(self, parameters: Any) -> Iterator[None]:
        """``parameters`` for one call; cleared on exit (also on error)."""
        self.current = parameters
        try:
            yield
        finally:
            self.current = None


class PerNegative:
    """What a run computes once per negative tensor (its keys and values, its text stream's start): the loop hands
    the same tensor for the same inputs at every call, so ``make(negative)`` runs once per distinct negative, keyed
    by identity (the tensor is held with its value, so its id stays its own). The ``kept`` latest are kept (a
    prompt edited at a step adds one)."""

    def __init__(self, make: Callable[[torch.Tensor], Any], kept: int = 4) -> None:
        self.make, self.kept = make, kept
        self._made: dict[int, tuple[torch.Tensor, Any]] = {}  # id(negative) → (negative, what was made of it)

    def __call__(self, negative: torch.Tensor) -> Any:
        entry = self._made.get(id(negative))
        if entry is None or entry[0] is not negative:
            if len(self._made) >= self.kept:
                del self._made[next(iter(self._made))]
            entry = self._made[id(negative)] = (negative, self.make(negative))
        return entry[1]


def attention_layers(denoiser: Any) -> list[tuple[str, Any]]:
    """(module path, module) of every attention layer, in the denoiser's order: the modules diffusers' mixin
    reports (``get_processor``), or, for a model without it (Z-Image's transformer), each with ``set_processor``."""
    test = "get_processor" if _has_mixin(denoiser) else "set_processor"
    return [
        (path, module)
        for path, module in denoiser.named_modules()
        if path and hasattr(type(module), test) and hasattr(module, "processor")  # the class: no __getattr__ miss
    ]


def _has_mixin(denoiser: Any) -> bool:
    """Whether ``denoiser`` has diffusers' attention mixin, asked by its method: ``hasattr`` of its
    ``attn_processors``, a property, would walk every module."""
    return hasattr(denoiser, "set_attn_processor")


def _processor(layer: Any) -> Any:
    return layer.get_processor() if hasattr(layer, "get_processor") else layer.processor


def processors_of(denoiser: Any) -> dict[str, Any]:
    """Every attention layer's processor, keyed ``<module path>.processor``: diffusers' ``attn_processors``, or,
    for a model without diffusers' attention mixin (Z-Image's transformer), each module's with ``set_processor``."""
    if _has_mixin(denoiser):
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
