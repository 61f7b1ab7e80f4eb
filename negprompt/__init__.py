"""negprompt: controllable and explainable negative prompts for text-to-image diffusion models."""

__version__ = "0.1.0"

from negprompt.api import Generation, GenerationSettings, generate, load_model, make_settings, run  # noqa: E402
from negprompt.guidance.plan import Guidance, Term  # noqa: E402
from negprompt.guidance.windows import Window  # noqa: E402

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
