"""negprompt: controllable and explainable negative prompts for text-to-image diffusion models.

The names below are imported on first use (PEP 562), so ``negprompt --help`` and usage errors answer
without importing torch or diffusers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from negprompt.version import __version__ as __version__  # a module of its own: read by runspec without a cycle

_EXPORTS = {
    "Generation": "negprompt.api",
    "generate": "negprompt.api",
    "run": "negprompt.api",
    "Guidance": "negprompt.guidance.plan",
    "Term": "negprompt.guidance.plan",
    "Window": "negprompt.guidance.windows",
    "RunSpec": "negprompt.runspec",
    "Session": "negprompt.session",
}

__all__ = ["Generation", "Guidance", "RunSpec", "Session", "Term", "Window", "generate", "run"]

if TYPE_CHECKING:
    from negprompt.api import Generation, generate, run
    from negprompt.guidance.plan import Guidance, Term
    from negprompt.guidance.windows import Window
    from negprompt.runspec import RunSpec
    from negprompt.session import Session


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'negprompt' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
