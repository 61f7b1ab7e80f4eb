"""The heat-map timeline: one row per word (positive, then negative), one column per step; and the
strength curve r_t of a negative word.

Each cell overlays the word's map at that step on that step's predicted clean image x̂₀. A row is
normalised by its largest value over the shown steps, so a map that is weak early and strong late
(the negative prompt's, per the article) shows as dim early cells and bright late ones. A video's timeline
is one latent frame's: its maps over that frame's x̂₀ frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from negprompt.attention.result import AttentionCapture
from negprompt.models.components import Components
from negprompt.sampling.loop import decode

CELL = 128
LABEL_WIDTH = 150
HEADER = 22
ALPHA = 0.55


def pick_steps(kept: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` steps spread evenly over ``kept`` (first and last included)."""
    if len(kept) <= count:
        return list(kept)
    picks = np.linspace(0, len(kept) - 1, count).round().astype(int)
    return [kept[i] for i in sorted(set(picks))]


def timeline(
    capture: AttentionCapture,
    components: Components,
    image: int = 0,
    columns: int = 10,
    rows: Sequence[tuple[str, str]] | None = None,
    steps: Sequence[int] | None = None,
    frame: int | None = None,
    decoded: dict[int, np.ndarray] | None = None,
) -> Image.Image:
    """The timeline figure for one image of the batch; ``rows`` are (branch, word) pairs (default: every captured
    word, positive first, then negative, then other branches'); ``steps`` the kept steps to show (default:
    ``columns`` of them, spread evenly); ``frame``: for a video's capture, the latent frame shown (required there,
    refused for images). ``decoded``: step → that step's decoded x̂₀ of ``image`` ((H, W, 3), a video's
    (F, H, W, 3)), filled on use: pass one dict to the calls that draw several frames of one video, and each step
    is decoded once, whole, instead of once per frame. Without one, a video whose family decodes causally in time
    (:func:`decodes_causally`) has only its latent frames 0…``frame`` decoded: the same pixels, less work."""
    if capture.generation is None or capture.generation.trace is None:
        raise ValueError("the timeline needs the capture's generation trace (capture with trace=True)")
    check_frame(capture, frame)
    steps = shown_steps(capture.index["steps"], columns, steps)
    rows = list(rows) if rows else default_rows(capture.index["words"])
    shared = decoded is not None
    decoded = {} if decoded is None else decoded
    latents = {info.step: info.denoised[image : image + 1] for info in capture.generation.trace if info.step in steps}
    backgrounds = {}
    for step in steps:  # the step's x̂₀ (1, C, h, w), a video's (1, C, F′, h, w), decoded to the cells' background
        pixels = shown_pixels(capture, components, step, latents[step], frame, decoded, whole=shared)
        backgrounds[step] = cell_background(pixels)
    return draw_timeline(capture, image, frame, steps, rows, backgrounds)


def shown_steps(kept: Sequence[int], columns: int, steps: Sequence[int] | None) -> list[int]:
    """The steps a timeline shows: ``steps``, all among the ``kept`` ones, or ``columns`` kept steps spread evenly."""
    if steps is None:
        return pick_steps(kept, columns)
    if any(step not in kept for step in steps):
        raise ValueError(f"steps {list(steps)} are not all among the captured steps {kept}")
    return list(steps)


def default_rows(words: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """(branch, word) of every captured word: the positive's, the negative's, then other branches' in their order."""
    rows = [(b, w) for b in ("positive", "negative") for w in words.get(b, [])]
    return rows + [(b, w) for b, ws in words.items() if b not in ("positive", "negative") for w in ws]


def decodes_causally(components: Components) -> bool:
    """Whether the model family declares that its VAE decodes a video causally in time: latent frames 0…f decode to
    the first frames of the whole video's decode, bit for bit (Wan's VAE decodes frame by frame, each frame seeing
    only earlier ones; tests/test_timeline_frames.py checks it on the tiny Wan)."""
    return components.family.decodes_causally


def shown_pixels(
    capture: AttentionCapture,
    components: Components,
    step: int,
    latents: torch.Tensor,
    frame: int | None,
    decoded: dict[int, np.ndarray],
    whole: bool,
) -> np.ndarray:
    """(H, W, 3): the decoded ``latents`` of ``step`` (1, C, h, w), or for a video (1, C, F′, h, w) its frame shown
    for latent frame ``frame`` (:func:`pixel_frame`). Decoded into ``decoded[step]`` unless it holds that frame
    already: all of it, or, unless ``whole``, a causal family's latent frames 0…``frame``."""
    if frame is None:
        if step not in decoded:
            decoded[step] = decode(components, latents.to(components.device))[0]
        return decoded[step]
    shown = pixel_frame(frame, capture.frames or 1, capture.generation.pixels.shape[1])
    if step not in decoded or len(decoded[step]) <= shown:
        through = None if whole or not decodes_causally(components) else frame + 1
        decoded[step] = decode(components, latents[:, :, :through].to(components.device))[0]  # (F or fewer, H, W, 3)
    return decoded[step][shown]


def cell_background(pixels: np.ndarray) -> np.ndarray:
    """(CELL, CELL, 3) in [0, 1]: ``pixels`` (H, W, 3) in gray, resized to a cell."""
    gray = pixels.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    return np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).resize((CELL, CELL), Image.BILINEAR)) / 255.0


def draw_timeline(
    capture: AttentionCapture,
    image: int,
    frame: int | None,
    steps: Sequence[int],
    rows: Sequence[tuple[str, str]],
    backgrounds: Mapping[int, np.ndarray],
) -> Image.Image:
    """The figure: a header naming the ``steps``, then one labelled row of cells per (branch, word) of ``rows``."""
    canvas = Image.new("RGB", (LABEL_WIDTH + len(steps) * CELL, HEADER + len(rows) * CELL), "white")
    draw = ImageDraw.Draw(canvas)
    for c, step in enumerate(steps):
        draw.text((LABEL_WIDTH + c * CELL + 4, 5), f"step {step}", fill="black")
    kept = capture.index["steps"]
    slots = [kept.index(s) for s in steps]
    for r, (branch, word) in enumerate(rows):
        maps = capture.maps(branch, word)[:, image]  # (kept steps, S, S); a video's (kept steps, F′, S, S)
        maps = maps if frame is None else maps[:, frame]
        top = HEADER + r * CELL
        draw.text((4, top + CELL // 2 - 12), word, fill="black")
        draw.text((4, top + CELL // 2 + 2), branch, fill="gray")
        draw_row(canvas, top, maps, capture.present(branch), slots, [backgrounds[s] for s in steps])
    return canvas


def draw_row(
    canvas: Image.Image,
    top: int,
    maps: torch.Tensor,
    present: torch.Tensor,
    slots: Sequence[int],
    backgrounds: Sequence[np.ndarray],
) -> None:
    """One word's cells at height ``top``: its map at each kept-step slot in ``slots`` (``maps``: (kept steps, S, S))
    over that step's background, normalised by the row's peak; a grayed "off" cell where the branch was not
    evaluated (``present``: (kept steps,) bool; e.g. a delayed negative)."""
    draw = ImageDraw.Draw(canvas)
    colormap = colormaps["inferno"]
    peak = max(float(maps[s].max()) for s in slots) or 1.0
    for c, (slot, background) in enumerate(zip(slots, backgrounds)):
        left = LABEL_WIDTH + c * CELL
        if bool(present[slot]):
            heat = torch.nn.functional.interpolate(maps[slot][None, None], size=(CELL, CELL), mode="bilinear")[0, 0]
            cell = (1 - ALPHA) * background + ALPHA * colormap((heat / peak).clamp(0, 1).numpy())[..., :3]
        else:
            cell = 0.4 * background + 0.6
        canvas.paste(Image.fromarray((cell * 255).astype(np.uint8)), (left, top))
        if not bool(present[slot]):
            draw.text((left + 4, top + 4), "off", fill="black")


def check_frame(capture: AttentionCapture, frame: int | None) -> None:
    """Raises ValueError unless ``frame`` is a latent frame of a video's capture, or None for images."""
    if capture.frames is None:
        if frame is not None:
            raise ValueError(f"frame {frame} given, but the capture holds images; give no frame")
        return
    if frame is None or not 0 <= frame < capture.frames:
        raise ValueError(
            f"the capture holds a video of {capture.frames} latent frames: give a frame in 0–{capture.frames - 1}"
        )


def pixel_frame(frame: int, latent_frames: int, pixel_frames: int) -> int:
    """The decoded frame shown for latent frame ``frame``: spread evenly, first to first and last to last (Wan's
    VAE: latent frame f ≥ 1 holds frames 4f − 3 … 4f; this gives 4f)."""
    if latent_frames <= 1:
        return 0
    return round(frame * (pixel_frames - 1) / (latent_frames - 1))


def strength_figure(
    steps: Sequence[int], curves: Mapping[str, torch.Tensor], negative_word: str, related: str, image: int = 0
) -> Image.Image:
    """r_t of ``negative_word`` over the kept ``steps`` for one image, one line per definition
    (``curves``: definition → (steps, B), as :func:`negprompt.analysis.strength.strength_curves`
    gives them; NaN where the negative branch was off), with r(i) = ``related`` in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.4), dpi=100)  # no pyplot: safe in a server's threads
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for definition, values in curves.items():
        axes.plot(list(steps), values[:, image].float().numpy(), marker="o", markersize=3, label=definition)
    axes.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    axes.set_xlabel("step")
    axes.set_ylabel("r_t")
    axes.set_title(f"strength of the negative word {negative_word!r} against r(i) = {related!r}", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())
