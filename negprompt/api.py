"""The Python API: everything the CLI does, as functions returning images and data.

>>> from negprompt import generate
>>> result = generate("a red circle", negative="a hat", seeds=[0, 1])
>>> result.images[0].save("circle.png")

``generate`` takes the common case as keywords and loads the model for that one call; to reuse a
loaded model, make a :class:`~negprompt.session.Session` and call its ``spec``/``run``/``generate``.
:class:`~negprompt.runsettings.RunSettings` holds what a run asks for (``session.spec_from(settings)``;
``dataclasses.replace`` for variations), the same fields as ``spec``'s keywords.
:class:`~negprompt.runspec.RunSpec` holds every setting of a run (it is what each PNG carries).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from negprompt.guidance.plan import Term
from negprompt.models.components import Components
from negprompt.runsettings import RunSettings
from negprompt.runspec import Generation, RunSpec, SettingsError, to_uint8
from negprompt.sampling.loop import StepCallback, UNetCallHook
from negprompt.session import Session, as_session, negative_terms

__all__ = [
    "Generation",
    "RunSettings",
    "RunSpec",
    "Session",
    "SettingsError",
    "generate",
    "negative_terms",
    "run",
    "to_uint8",
]


def run(
    spec: RunSpec,
    session: Session | Components | None = None,
    *,
    trace: bool = False,
    callback: StepCallback | None = None,
    unet_hooks: Sequence[UNetCallHook] = (),
    progress: bool = False,
) -> Generation:
    """Executes ``spec`` on ``session`` (Components are wrapped in one; default: a new session loading
    ``spec.model`` on the spec's device in its dtype)."""
    session = as_session(spec.model if session is None else session, device=spec.device, dtype=spec.dtype)
    return session.run(spec, trace=trace, callback=callback, unet_hooks=unet_hooks, progress=progress)


def generate(
    prompt: str | Sequence[str] = "",
    negative: str | Sequence[str | Term] | None = None,
    *,
    model: str | Path | Components | Session | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trace: bool = False,
    callback: StepCallback | None = None,
    progress: bool = False,
    **options: Any,
) -> Generation:
    """Generates one image per seed. Options are those of :meth:`Session.spec`; ``model`` may be a Session.
    On a video model (Wan) one video per seed: ``frames=`` its frame count, ``.pixels`` (B, F, H, W, 3)."""
    session = model if isinstance(model, Session) else Session(model, device=device, dtype=dtype)
    return session.generate(prompt, negative, trace=trace, callback=callback, progress=progress, **options)
