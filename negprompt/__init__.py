"""negprompt: controllable and explainable negative prompts for text-to-image diffusion models."""

__version__ = "0.1.0"

from negprompt.api import Generation, generate, run  # noqa: E402
from negprompt.guidance.plan import Guidance, Term  # noqa: E402
from negprompt.guidance.windows import Window  # noqa: E402
from negprompt.runspec import RunSpec  # noqa: E402
from negprompt.session import Session  # noqa: E402

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
