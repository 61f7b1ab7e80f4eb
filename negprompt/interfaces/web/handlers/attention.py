"""The Attention tab's work: one image with the chosen words' cross-attention maps on the positive and
negative branches, its heat-map timeline, one step of it, and a negative word's strength r_t."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.analysis.strength import strength_curves
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.figures import strength_figure, timeline
from negprompt.attention.result import AttentionCapture, capture
from negprompt.attention.tokens import tokenize_words
from negprompt.interfaces.web.handlers.generation import GenerateRequest, NegativeInput, run_settings, save_outputs
from negprompt.interfaces.web.handlers.jobs import PageJob
from negprompt.interfaces.web.handlers.values import count, whole, word_list
from negprompt.interfaces.web.settings import ServerLimits
from negprompt.runspec import SettingsError
from negprompt.session import Session

CAPTURE_MEMORY_MB = 256.0  # what one Attention-tab capture may store


@dataclass(frozen=True)
class AttentionRequest:
    """The Attention tab's settings: one image (one video on a video model, of ``frames`` frames: None, the
    model's default); words comma-separated (empty: every word of the prompt)."""

    prompt: str
    negative: str
    words: str = ""
    negative_words: str = ""
    rule: str = "sd"
    scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int | str = 0  # the page sends the seed field's text
    columns: int = 10
    width: int | None = None  # None: the model's default (the page sends none)
    height: int | None = None
    frames: int | None = None


@dataclass
class AttentionResult:
    capture: AttentionCapture
    png: Path  # the image; a video's: its clip (MP4, or animated WebP), its frames beside it
    timeline: Image.Image  # a video's: latent frame 0's (see :func:`frame_view`)
    steps: list[int]  # the captured steps (the step slider's range)
    negative_words: list[str]
    latent_frames: int | None = None  # a video's F′: its maps are (steps, B, F′, h′, w′) per word

    @property
    def is_video(self) -> bool:
        return self.latent_frames is not None


def attend(
    session: Session, request: AttentionRequest, limits: ServerLimits, folder: Path, job: PageJob
) -> AttentionResult:
    """Generates one image while capturing the chosen words' cross-attention maps on the positive and
    negative branches; the heat-map timeline as ``negprompt attend`` draws it."""
    if not (request.negative or "").strip():
        raise SettingsError("the attention maps of a negative need a negative prompt")
    columns = count(request.columns, "columns")
    generate_request = GenerateRequest(
        prompt=request.prompt,
        negatives=(NegativeInput(request.negative),),
        rule=request.rule,
        scale=request.scale,
        steps=request.steps,
        scheduler=request.scheduler,
        seed=request.seed,
        width=request.width,
        height=request.height,
        frames=request.frames,
    )
    spec = session.spec_from(run_settings(session, generate_request, limits))
    tokenizer = session.components.tokenizer
    words = {}
    for branch, given in (("positive", request.words), ("negative", request.negative_words)):
        chosen = word_list(given)
        if not chosen:
            prompt = spec.guidance.terms[branch].prompts_for(1)[0]
            chosen = list(dict.fromkeys(tokenize_words(tokenizer, prompt).words))
        limits.check("words", len(chosen), f"{branch} words:")
        words[branch] = chosen
    request_maps = CaptureRequest(words=words, memory_limit_mb=CAPTURE_MEMORY_MB)
    with job.holding(session):
        result = capture(
            spec, request_maps, session, trace=True, reducer=reduce_layer, callback=job.step_callback(session, 0)
        )
        figure = timeline(result, session.components, columns=columns, frame=None if result.frames is None else 0)
    [png] = save_outputs(result.generation, folder / ("video" if result.frames else "image"))
    return AttentionResult(result, png, figure, list(result.index["steps"]), words["negative"], result.frames)


def latent_frame(result: AttentionCapture, frame: Any) -> int | None:
    """``frame`` checked against a video's captured latent frames (None: 0); None for images."""
    if result.frames is None:
        return None
    frame = 0 if frame is None else whole(frame, "frame")
    if not 0 <= frame < result.frames:
        raise SettingsError(f"frame {frame} was not captured; latent frames: 0–{result.frames - 1}")
    return frame


def step_view(session: Session, result: AttentionCapture, step: int, frame: int | None = None) -> Image.Image:
    """The timeline at one captured step: each word's map over that step's x̂₀ (a video's: at latent ``frame``,
    default 0). No lock: it reads the stored capture and decodes one latent."""
    step = whole(step, "step")
    kept = result.index["steps"]
    if step not in kept:
        raise SettingsError(f"step {step} was not captured; captured steps: {kept[0]}–{kept[-1]}")
    return timeline(result, session.components, steps=[step], frame=latent_frame(result, frame))


def frame_view(session: Session, result: AttentionCapture, frame: int, columns: int = 10) -> Image.Image:
    """A video's timeline at latent ``frame``: each word's maps (F′ per step, one shown) over that frame of x̂₀."""
    if result.frames is None:
        raise SettingsError("the capture holds an image, not a video: it has no frames to choose from")
    return timeline(result, session.components, columns=count(columns, "columns"), frame=latent_frame(result, frame))


def strength_view(result: AttentionCapture, negative_word: str) -> tuple[Image.Image, str]:
    """The r_t curve of ``negative_word`` (both definitions) and r(i), the positive word chosen for it."""
    curves = strength_curves(result, negative_word)
    related = curves["related"][0]
    figure = strength_figure(
        result.index["steps"],
        {"article, eq. (10)": curves["article"], "released code": curves["released"]},
        negative_word,
        related,
    )
    note = (
        f"r(i) = **{related}**: chosen automatically, the positive word whose maps are most like "
        f"those of **{negative_word}** over the steps where the negative acts"
    )
    return figure, note
