"""The work behind each button of ``negprompt serve``, as plain functions: plain values in, images, files
and text out. The page's tabs only lay them out; the tests call them directly.

One module per kind of work, and what they share:

- :mod:`~negprompt.interfaces.web.handlers.jobs`: :class:`PageJob` (one visitor's request: progress, x̂₀
  previews, cancel) and :func:`error_message` (any exception as the page's one line);
- :mod:`~negprompt.interfaces.web.handlers.values`: the fields' plain values (whole numbers, seeds as text);
- :mod:`~negprompt.interfaces.web.handlers.generation`: the Generate tab (:func:`generate`, :func:`warm_up`);
- :mod:`~negprompt.interfaces.web.handlers.attention`: the Attention tab (:func:`attend` and its views);
- :mod:`~negprompt.interfaces.web.handlers.edits`: the Edit tab (:func:`edit`, :func:`sweep`).

Every function that runs the model takes a :class:`PageJob` and through it holds the session's lock for
the whole job (one job per loaded model at a time), reports progress, and stops at the next UNet call once
cancelled. Bad input raises a :class:`~negprompt.errors.NegpromptError` whose first line is what the
command line would print; :func:`error_message` turns any exception into the page's one line.
"""

from __future__ import annotations

from negprompt.errors import NegpromptError
from negprompt.interfaces.web.handlers.attention import (
    CAPTURE_MEMORY_MB,
    AttentionRequest,
    AttentionResult,
    attend,
    frame_view,
    step_view,
    strength_view,
)
from negprompt.interfaces.web.handlers.edits import (
    EditRequest,
    EditResult,
    SweepRequest,
    SweepResult,
    edit,
    edit_table,
    sweep,
)
from negprompt.interfaces.web.handlers.generation import (
    COMPARE_LABELS,
    GenerateRequest,
    GenerateResult,
    NegativeInput,
    generate,
    generate_specs,
    run_settings,
    save_outputs,
    schedule_length,
    warm_up,
)
from negprompt.interfaces.web.handlers.jobs import LOG, Cancelled, PageJob, Progress, error_message, preview_image
from negprompt.interfaces.web.handlers.values import (
    content_word,
    count,
    example_pair,
    optional_number,
    seeds_from,
    whole,
    word_list,
)
from negprompt.interfaces.web.settings import LimitError

__all__ = [
    "CAPTURE_MEMORY_MB",
    "COMPARE_LABELS",
    "LOG",
    "AttentionRequest",
    "AttentionResult",
    "Cancelled",
    "EditRequest",
    "EditResult",
    "GenerateRequest",
    "GenerateResult",
    "LimitError",
    "NegativeInput",
    "NegpromptError",
    "PageJob",
    "Progress",
    "SweepRequest",
    "SweepResult",
    "attend",
    "frame_view",
    "content_word",
    "count",
    "edit",
    "edit_table",
    "error_message",
    "example_pair",
    "generate",
    "generate_specs",
    "optional_number",
    "preview_image",
    "run_settings",
    "save_outputs",
    "schedule_length",
    "seeds_from",
    "step_view",
    "strength_view",
    "sweep",
    "warm_up",
    "whole",
    "word_list",
]
