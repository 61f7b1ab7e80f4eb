"""``negprompt demo``: no negative, a negative, and a delayed negative, side by side, in one figure.

A last column block shows the edit: where the delayed negative changed the image (|delayed − none|,
largest channel difference, white = 1). The rows' (prompt, negative) pairs are the model's
``demo_pairs`` in its ``negprompt.json`` when it declares them, else :data:`DEMO_PAIRS`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from negprompt.api import Generation, to_uint8
from negprompt.files import write_atomically, write_json
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window
from negprompt.runspec import RunSpec
from negprompt.session import Session, as_session

# The bundled model's pairs (its negprompt.json declares the same): most rows remove a hat, the thing
# whose removal is easiest to see; "blurry" shows a quality negative.
DEMO_PAIRS = (
    ("a red circle", "a hat"),
    ("a blue square", "a hat"),
    ("a green triangle", "blurry"),
    ("a purple circle", "a hat"),
)
DELAY = 0.25  # the delayed negative starts after this fraction of the steps


@dataclass(frozen=True)
class Variant:
    label: str
    rule: str
    window: Window | None  # None: no negative at all


VARIANTS = (
    Variant("no negative", "cfg", None),
    Variant("negative, all steps", "sd", Window()),
    Variant(f"negative from {DELAY:.0%} of the steps", "sd", Window(DELAY)),
)


def demo_pairs(session: Session) -> tuple[tuple[str, str], ...]:
    """The model's ``demo_pairs`` ([[prompt, negative], …] in its negprompt.json), else :data:`DEMO_PAIRS`."""
    declared = session.components.declarations.demo_pairs
    return DEMO_PAIRS if declared is None else declared


def run_demo(out_dir: str | Path, model=None, seeds=(0, 1, 2), steps: int | None = None, progress: bool = False):
    """Generates every variant for every (prompt, negative) pair; writes ``demo.png`` and ``demo.json``."""
    started = time.monotonic()
    session = as_session(model)
    pairs = demo_pairs(session)
    # One batched loop; the delayed variant shares the no-negative variant's first steps.
    generations = session.run_together(demo_specs(session, seeds, steps), progress=progress)
    figure = _figure(generations, pairs, len(seeds))
    out_dir = Path(out_dir)
    record = {
        "pairs": [{"prompt": p, "negative": n} for p, n in pairs],
        "variants": [g.spec.to_json() for g in generations],
        "seconds": round(time.monotonic() - started, 2),
    }
    png, js = out_dir / "demo.png", out_dir / "demo.json"
    write_atomically([png], lambda final, tmp: figure.save(tmp, format="PNG"))
    write_json(js, record, indent=2)
    return png, js, record


def demo_specs(session: Session, seeds=(0, 1, 2), steps: int | None = None) -> list[RunSpec]:
    """The runs of the demo, one per variant, each over every (prompt, negative) pair × ``seeds``."""
    pairs = demo_pairs(session)
    prompts = tuple(p for p, _ in pairs for _ in seeds)
    negatives = tuple(n for _, n in pairs for _ in seeds)
    all_seeds = [s for _ in pairs for s in seeds]
    return [
        session.spec(
            prompts,
            None if v.window is None else [Term(negatives, None, v.window)],
            rule=v.rule,
            seeds=all_seeds,
            steps=steps,
        )
        for v in VARIANTS
    ]


def _figure(
    generations: list[Generation], pairs: tuple[tuple[str, str], ...], per_pair: int, zoom: int = 3, gap: int = 6
) -> Image.Image:
    """Rows: (prompt, negative) pairs; column blocks: variants; ``per_pair`` seeds in each block."""
    h, w = generations[0].pixels.shape[1:3]
    cell_w, cell_h = w * zoom, h * zoom
    label_w, header_h = 170, 28
    block_w = per_pair * cell_w + gap
    plain, delayed = generations[0].pixels, generations[-1].pixels
    changed = np.repeat(np.abs(delayed - plain).max(axis=-1, keepdims=True), 3, axis=-1)  # (N, H, W, 3)
    blocks = [g.pixels for g in generations] + [changed]
    labels = [v.label for v in VARIANTS] + ["changed by the delayed negative"]
    width = label_w + len(blocks) * block_w
    height = header_h + len(pairs) * (cell_h + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for v, label in enumerate(labels):
        draw.text((label_w + v * block_w + 2, 8), label, fill="black")
    for r, (prompt, negative) in enumerate(pairs):
        top = header_h + r * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 12), prompt, fill="black")
        draw.text((4, top + cell_h // 2 + 2), f"negative: {negative}", fill="gray")
        for v, pixels in enumerate(blocks):
            for k in range(per_pair):
                image = Image.fromarray(to_uint8(np.clip(pixels[r * per_pair + k], 0.0, 1.0)))
                image = image.resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(image, (label_w + v * block_w + k * cell_w, top))
    return canvas
