"""Contact sheets for a human audit of the detectors on the bundled model's own images.

For each evaluation row (``negprompt evaluate``'s prompts and seeds: image i of a row is the same
here), the first N images are drawn at 4× with what the detectors read under each one:
shape, color, then H (hat), S (sun), T (striped), B (blurry) for the things found, ? for an
unreadable attribute. A person looks at each sheet and records, per image and attribute, whether
they agree (docs/audit/audit.md).

    python scripts/audit_sheet.py --images 40 --out docs/audit [--rows "negative blurry" ...] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from negprompt.api import to_uint8
from negprompt.guidance.plan import Term
from negprompt.session import Session
from negprompt.shapes.detectors import detect
from negprompt.shapes.evaluation import ROWS, row_prompts

SCALE, COLUMNS, LABEL = 4, 8, 24
EVALUATION_BATCH = 48  # negprompt.shapes.evaluation.evaluate's default batch
LETTERS = {"hat": "H", "sun": "S", "striped": "T", "blurry": "B"}


def label(found) -> tuple[str, str]:
    first = f"{'?' if found.unreadable('shape') else found.shape or '-'} {'?' if found.unreadable('color') else found.color or '-'}"
    things = "".join(
        "?" if found.unreadable(name) else letter if getattr(found, name) else "·" for name, letter in LETTERS.items()
    )
    return first, things


def sheet(pixels: np.ndarray, title: str) -> tuple[Image.Image, list[dict]]:
    images = to_uint8(pixels)
    side = images.shape[1] * SCALE
    rows = (len(images) + COLUMNS - 1) // COLUMNS
    canvas = Image.new("RGB", (COLUMNS * side, 16 + rows * (side + LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black")
    records = []
    for i, image in enumerate(images):
        found = detect(image)
        x, y = (i % COLUMNS) * side, 16 + (i // COLUMNS) * (side + LABEL)
        canvas.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (x, y))
        first, things = label(found)
        draw.text((x + 2, y + side), f"{i} {first}", fill="black")
        draw.text((x + 2, y + side + 11), things, fill="black")
        records.append({"index": i, "seed": i, **found.to_json()})
    return canvas, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="images per row (default 40)")
    parser.add_argument("--out", default="docs/audit", help="folder for the sheets (default docs/audit)")
    parser.add_argument("--rows", nargs="*", default=None, help="row names (default: every evaluation row)")
    parser.add_argument("--model", default="shapes", help="model folder (default: the bundled model)")
    args = parser.parse_args()
    session = Session(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    detections = {}
    for row in ROWS:
        if args.rows and row.name not in args.rows:
            continue
        batch = max(args.images, EVALUATION_BATCH)  # evaluate's first batch: bit-identical images
        prompts, _ = row_prompts(row, batch)
        spec = session.spec(
            tuple(prompts),
            None if row.negative is None else [Term(row.negative)],
            rule="sd" if row.negative else "cfg",
            seeds=range(batch),
        )
        pixels = session.run(spec).pixels[: args.images]
        prompts = prompts[: args.images]
        canvas, records = sheet(pixels, f"{row.name}: {row.template}  − {row.negative or 'none'}")
        name = row.name.replace(" − ", "-without-").replace(" ", "-")
        canvas.save(out / f"{name}.png")
        detections[row.name] = [{**r, "prompt": p} for r, p in zip(records, prompts)]
        print(f"wrote {out / name}.png")
    (out / "detections.json").write_text(json.dumps(detections, indent=1) + "\n")


if __name__ == "__main__":
    main()
