"""The heat-map timeline: one row per word (positive, then negative), one column per step.

Each cell overlays the word's map at that step on that step's predicted clean image x̂₀. A row is
normalised by its largest value over the shown steps, so a map that is weak early and strong late
(the negative prompt's, per the article) shows as dim early cells and bright late ones.
"""

from __future__ import annotations

from collections.abc import Sequence

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
) -> Image.Image:
    """The timeline figure for one image of the batch; ``rows`` are (branch, word) pairs."""
    if capture.generation is None or capture.generation.trace is None:
        raise ValueError("the timeline needs the capture's generation trace (capture with trace=True)")
    trace = {info.step: info for info in capture.generation.trace}
    kept = capture.index["steps"]
    steps = pick_steps(kept, columns)
    rows = rows or [(b, w) for b in ("positive", "negative") for w in capture.index["words"].get(b, [])]
    rows += [(b, w) for b, ws in capture.index["words"].items() if b not in ("positive", "negative") for w in ws]

    backgrounds = {}
    for step in steps:
        pixels = decode(components, trace[step].denoised[image : image + 1].to(components.device))[0]
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
        maps = capture.maps(branch, word)[:, image]  # (kept steps, S, S)
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
