"""A page's job as the handlers see it: progress reports, x̂₀ previews, cancel, and the one line an error
becomes on the page."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from negprompt.errors import NegpromptError, one_line
from negprompt.runspec import to_uint8
from negprompt.sampling.loop import StepInfo, decode
from negprompt.session import Session

LOG = logging.getLogger("negprompt.serve")


class Cancelled(NegpromptError):
    """The visitor cancelled the job."""


Progress = Callable[[int, "int | None", "Image.Image | None"], None]  # (done, in all or None, x̂₀ preview or None)


@dataclass
class PageJob:
    """How a job reports progress and is stopped.

    ``on_progress(done, total, preview)``: after each sampling step (through :meth:`step_callback`,
    with the predicted clean image x̂₀ of the first image every ``preview_every`` steps and at most
    every ``preview_seconds``), or after each UNet call for work whose steps are not reported (edit,
    sweep; ``total``: ``expected_calls`` when known). ``cancel()`` may be called from any thread.
    """

    on_progress: Progress | None = None
    preview_every: int = 1
    preview_seconds: float = 0.0  # and at least so long apart (decoding x̂₀ costs a VAE call on latent models)
    expected_calls: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)  # set by whoever runs the job
    unet_calls: int = 0

    def cancel(self) -> None:
        self.stop.set()

    def check(self) -> None:
        """Raises :class:`Cancelled` once the job was cancelled."""
        if self.stop.is_set():
            raise Cancelled("cancelled")

    @contextmanager
    def holding(self, session: Session, report_calls: bool = False) -> Iterator[None]:
        """Holds ``session`` (its lock: one job per loaded model at a time) and stops the job at its next
        UNet call after :meth:`cancel` (a forward pre-hook on the UNet, removed on exit); with
        ``report_calls`` each UNet call is reported as progress."""

        def before_unet(module: Any, args: Any) -> None:
            self.check()
            self.unet_calls += 1
            if report_calls and self.on_progress is not None:
                self.on_progress(self.unet_calls, self.expected_calls, None)

        with session.exclusive() as components:
            self.check()
            handle = components.denoiser.register_forward_pre_hook(before_unet)
            try:
                yield
            finally:
                handle.remove()

    def step_callback(self, session: Session, group: int) -> Callable[[StepInfo], None]:
        """A sampling-loop callback reporting the steps of ``group``, with x̂₀ previews."""
        last_preview = [-math.inf]

        def report(info: StepInfo) -> None:
            if self.on_progress is None or info.group != group:
                return
            done = info.step + 1
            preview = None
            due = info.step % self.preview_every == 0 if self.preview_every else False
            now = time.monotonic()
            if (due and now - last_preview[0] >= self.preview_seconds) or (
                self.preview_every and done == info.num_steps
            ):
                preview = preview_image(session, info)
                last_preview[0] = now
            self.on_progress(done, info.num_steps, preview)

        return report


def preview_image(session: Session, info: StepInfo) -> Image.Image:
    """The predicted clean image x̂₀ of the step's first image (a video's: its first frame)."""
    pixels = decode(session.components, info.denoised[:1].to(session.components.device))[0]
    if pixels.ndim == 4:  # a video's frames (F, H, W, 3)
        pixels = pixels[0]
    return Image.fromarray(to_uint8(np.clip(pixels, 0.0, 1.0)))


def error_message(error: BaseException) -> str:
    """The one line the page shows for ``error``: the command line's ``negprompt: error: …`` for bad
    input, ``cancelled``, or ``negprompt: failed: …`` (the traceback goes to the server's log only)."""
    if isinstance(error, Cancelled):
        return "cancelled"
    if isinstance(error, NegpromptError):
        return f"negprompt: error: {one_line(error)}"
    if isinstance(error, OSError):
        return f"negprompt: failed: {error.strerror or one_line(error)}"
    LOG.error("request failed", exc_info=error)
    return f"negprompt: failed: {type(error).__name__} in the server (its log has the details)"
