"""negprompt: controllable and explainable negative prompts for text-to-image diffusion models."""

from negprompt.api import Generation, GenerationSettings, generate, load_model, make_settings, run  # noqa: E402
from negprompt.guidance.plan import Guidance, Term  # noqa: E402
from negprompt.guidance.windows import Window  # noqa: E402
from negprompt.version import __version__ as __version__  # a module of its own, so that api.py reads it without a cycle

__all__ = [
    "Generation",
    "GenerationSettings",
    "Guidance",
    "Term",
    "Window",
    "generate",
    "load_model",
    "make_settings",
    "run",
]
