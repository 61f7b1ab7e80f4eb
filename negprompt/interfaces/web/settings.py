"""What one request to ``negprompt serve`` may ask of the loaded model, and where the server may listen.

Light on purpose (no gradio, torch or numpy): the command line generates ``serve``'s ``--max-…``
flags from :class:`ServerLimits` before anything heavy is imported.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any

from negprompt.errors import NegpromptError
from negprompt.limits import MAX_FRAMES, MAX_IMAGES, MAX_SIDE, MAX_STEPS

# What the page offers before a visitor types anything: the first click should show a negative acting.
EXAMPLE_SEED = 2  # on the bundled model the example pair's plain image has the negative's hat at seed 2 (and
# the negative removes it); at seed 0 there is no hat and nothing to see (tests/test_web.py checks this)
EDIT_START = 1  # the Edit tab's delayed negative starts at UNet call 1: the bundled model settles a hat within
# its first two steps, so a later start keeps it (docs/edit-sweep/sweep.md: start 4 removes 7 %)
UPLOAD_LIMIT = "1mb"  # Gradio's max_file_size: the page takes no uploads; its upload route refuses larger files
LOG_LINE_CHARS = 2000  # a line the server writes to its log (stderr) is cut after this many characters


class LimitError(NegpromptError):
    """A request over one of the server's limits."""


def limit(default: int, what: str, ceiling: int) -> Any:
    """A limit field: its default, what it bounds (for help and messages) and the largest value it may take."""
    return field(default=default, metadata={"what": what, "ceiling": ceiling})


@dataclass(frozen=True)
class ServerLimits:
    """Bounds of one request, so that one visitor cannot hold the model for long or fill its memory.

    Each field is the flag ``--max-<field>`` of ``negprompt serve``; the page shows the limits beside
    its fields, and a request beyond one (from the page or its API) gets a one-line message naming
    the flag.
    """

    steps: int = limit(100, "inference steps of a run", MAX_STEPS)
    side: int = limit(1024, "image side in pixels", MAX_SIDE)
    images: int = limit(4, "images (seeds) of a run", MAX_IMAGES)
    negatives: int = limit(3, "negative prompts of a run", 16)
    words: int = limit(8, "words mapped per branch on the Attention tab", 77)
    prompt_chars: int = limit(500, "characters of one prompt", 100_000)
    sweep_images: int = limit(8, "images of a start sweep on the Edit tab", MAX_IMAGES)
    queue: int = limit(16, "requests waiting in the queue (more are turned away)", 10_000)
    frames: int = limit(81, "frames of a video (video models)", MAX_FRAMES)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            ceiling = item.metadata["ceiling"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
                raise LimitError(f"{self.flag(item.name)} must be a whole number in 1–{ceiling}, got {value!r}")

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of a limit, e.g. ``--max-steps``."""
        return f"--max-{name.replace('_', '-')}"

    @classmethod
    def described(cls) -> list[tuple[str, str, int, int]]:
        """(name, what it bounds, default, ceiling) of every limit, in order."""
        return [(f.name, f.metadata["what"], f.default, f.metadata["ceiling"]) for f in fields(cls)]

    def check(self, name: str, value: int, given_as: str | None = None) -> None:
        """Raises :class:`LimitError` if ``value`` exceeds the limit ``name``; the message names the
        value (as ``given_as``, default the limit's name), the limit and the flag that sets it."""
        allowed = getattr(self, name)
        if value > allowed:
            label = given_as or name.replace("_", " ")
            what = next(f.metadata["what"] for f in fields(self) if f.name == name)
            raise LimitError(
                f"{label} {value} is over this server's limit of {allowed} "
                f"({what}; set by negprompt serve {self.flag(name)})"
            )

    def check_text(self, label: str, text: str) -> None:
        """Raises :class:`LimitError` if ``text`` is longer than ``prompt_chars``."""
        if len(text) > self.prompt_chars:
            raise LimitError(
                f"{label} has {len(text)} characters, over this server's limit of {self.prompt_chars} "
                f"(set by negprompt serve {self.flag('prompt_chars')})"
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost``, 127.0.0.0/8 or ::1."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False
