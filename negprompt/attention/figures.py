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
    """The timeline figure for one image of the batch; ``rows`` are (branch, word) pairs; ``steps``
    the kept steps to show (default: ``columns`` of them, spread evenly); ``frame``: for a video's capture, the
    latent frame shown (required there, refused for images). ``decoded``: step → that step's decoded x̂₀ of
    ``image`` ((H, W, 3), a video's (F, H, W, 3)), filled on use: pass one dict to the calls that draw several
    frames of one video, and each step is decoded once instead of once per frame."""
    if capture.generation is None or capture.generation.trace is None:
        raise ValueError("the timeline needs the capture's generation trace (capture with trace=True)")
    check_frame(capture, frame)
    trace = {info.step: info for info in capture.generation.trace}
    kept = capture.index["steps"]
    if steps is None:
        steps = pick_steps(kept, columns)
    elif any(step not in kept for step in steps):
        raise ValueError(f"steps {list(steps)} are not all among the captured steps {kept}")
    rows = rows or [(b, w) for b in ("positive", "negative") for w in capture.index["words"].get(b, [])]
    rows += [(b, w) for b, ws in capture.index["words"].items() if b not in ("positive", "negative") for w in ws]

    decoded = {} if decoded is None else decoded
    backgrounds = {}
    for step in steps:
        if step not in decoded:
            decoded[step] = decode(components, trace[step].denoised[image : image + 1].to(components.device))[0]
        pixels = decoded[step]
        if frame is not None:  # a video's frames (F, H, W, 3): the one at the latent frame
            pixels = pixels[pixel_frame(frame, capture.frames or 1, pixels.shape[0])]
        gray = pixels.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
        backgrounds[step] = (
            np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).resize((CELL, CELL), Image.BILINEAR)) / 255.0
        )

    colormap = colormaps["inferno"]
    width = LABEL_WIDTH + len(steps) * CELL
    height = HEADER + len(rows) * CELL
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, step in enumerate(steps):
        draw.text((LABEL_WIDTH + c * CELL + 4, 5), f"step {step}", fill="black")
    for r, (branch, word) in enumerate(rows):
        maps = capture.maps(branch, word)[:, image]  # (kept steps, S, S); a video's (kept steps, F′, S, S)
        maps = maps if frame is None else maps[:, frame]
        present = capture.present(branch)
        slots = [kept.index(s) for s in steps]
        peak = max(float(maps[s].max()) for s in slots) or 1.0
        top = HEADER + r * CELL
        draw.text((4, top + CELL // 2 - 12), word, fill="black")
        draw.text((4, top + CELL // 2 + 2), branch, fill="gray")
        for c, (step, slot) in enumerate(zip(steps, slots)):
            background = backgrounds[step]
            if bool(present[slot]):
                heat = torch.nn.functional.interpolate(maps[slot][None, None], size=(CELL, CELL), mode="bilinear")[0, 0]
                colored = colormap((heat / peak).clamp(0, 1).numpy())[..., :3]
                cell = (1 - ALPHA) * background + ALPHA * colored
            else:  # the branch was not evaluated at this step (e.g. a delayed negative)
                cell = 0.4 * background + 0.6
            canvas.paste(Image.fromarray((cell * 255).astype(np.uint8)), (LABEL_WIDTH + c * CELL, top))
            if not bool(present[slot]):
                draw.text((LABEL_WIDTH + c * CELL + 4, top + 4), "off", fill="black")
    return canvas


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
