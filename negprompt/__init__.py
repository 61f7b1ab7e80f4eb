"""negprompt: controllable and explainable negative prompts for text-to-image diffusion models."""

from negprompt.api import Generation, generate, run  # noqa: E402
from negprompt.guidance.plan import Guidance, Term  # noqa: E402
from negprompt.guidance.windows import Window  # noqa: E402
from negprompt.runspec import RunSpec  # noqa: E402
from negprompt.session import Session  # noqa: E402
from negprompt.version import __version__ as __version__  # a module of its own: read by runspec without a cycle

__all__ = [
    "Generation",
    "Guidance",
    "RunSpec",
    "Session",
    "Term",
    "Window",
    "generate",
    "run",
]
