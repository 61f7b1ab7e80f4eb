"""Quality of a shapes-world model, measured against ground truth with the detectors.

Each row generates ``images`` pictures (prompts cycle over every color × shape, seeds 0 … n−1, the
same seeds in every row so rows compare image by image) and reports how often the detectors find
each attribute. Targets are those of the bundled model's issue; a row passes when all its targets do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from negprompt.api import to_uint8
from negprompt.guidance.plan import Term
from negprompt.models.components import Components
from negprompt.session import Session, as_session
from negprompt.shapes.detectors import detect
from negprompt.shapes.scene import COLORS, SHAPES

ATTRIBUTES = ("color", "shape", "hat", "sun", "striped", "blurry", "impossible")


@dataclass(frozen=True)
class Target:
    attribute: str
    low: float = 0.0  # fraction of images, inclusive
    high: float = 1.0

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.high >= 1.0:
            return f"{self.attribute} ≥ {self.low:.0%}"
        if self.low <= 0.0:
            return f"{self.attribute} ≤ {self.high:.0%}"
        return f"{self.attribute} {self.low:.0%}–{self.high:.0%}"


@dataclass(frozen=True)
class Row:
    name: str
    template: str  # formatted with color and shape
    negative: str | None = None
    targets: tuple[Target, ...] = field(default_factory=tuple)


NAMED = (Target("color", 0.90), Target("shape", 0.85))
KEPT = (Target("color", 0.85), Target("shape", 0.85))

ROWS: tuple[Row, ...] = (
    Row("plain", "a {color} {shape}", None, NAMED + (Target("hat", 0.2, 0.7), Target("sun", 0.2, 0.7))),
    Row("named hat", "a {color} {shape} with a hat", None, NAMED + (Target("hat", 0.85),)),
    Row("named sun", "a {color} {shape} with a sun", None, NAMED + (Target("sun", 0.85),)),
    Row("named striped", "a striped {color} {shape}", None, NAMED + (Target("striped", 0.85),)),
    Row("named blurry", "a blurry {color} {shape}", None, NAMED + (Target("blurry", 0.85),)),
    Row("negative hat", "a {color} {shape}", "a hat", KEPT + (Target("hat", 0.0, 0.10),)),
    Row("negative sun", "a {color} {shape}", "a sun", KEPT + (Target("sun", 0.0, 0.10),)),
    Row("negative blurry", "a {color} {shape}", "blurry", KEPT + (Target("blurry", 0.0, 0.10),)),
    Row("negative striped", "a {color} {shape}", "striped", KEPT + (Target("striped", 0.0, 0.10),)),
)

# Compositional rows (the model issue's targets): one removable thing named, another negated. The
# negated one must go (≤ 10 %), the named one stay (≥ 90 %), color and shape hold (≥ 90 %), and
# scenes the world never draws (two suns, two hats) stay rare (≤ 2 %).
NAMING = {
    "hat": ("a {color} {shape} with a hat", "a hat"),
    "sun": ("a {color} {shape} with a sun", "a sun"),
    "striped": ("a striped {color} {shape}", "striped"),
    "blurry": ("a blurry {color} {shape}", "blurry"),
}
COMPOSITIONAL: tuple[Row, ...] = tuple(
    Row(
        f"{named} − {negated}",
        NAMING[named][0],
        NAMING[negated][1],
        (
            Target("color", 0.90),
            Target("shape", 0.90),
            Target(named, 0.90),
            Target(negated, 0.0, 0.10),
            Target("impossible", 0.0, 0.02),
        ),
    )
    for named in NAMING
    for negated in NAMING
    if named != negated
)
ROWS = ROWS + COMPOSITIONAL


def row_prompts(row: Row, count: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The prompts of a row and the (color, shape) each names, cycling over all combinations."""
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    chosen = [pairs[i % len(pairs)] for i in range(count)]
    return [row.template.format(color=c, shape=s) for c, s in chosen], chosen


def score_images(pixels: np.ndarray, named: Sequence[tuple[str, str]]) -> tuple[dict[str, float], dict[str, int]]:
    """Per attribute: the fraction of the readable images where it is found (color/shape: the named one),
    and how many images the detectors could not read for it (``UNREADABLE``: not counted in the fraction;
    NaN when none was readable)."""
    hits = {a: 0 for a in ATTRIBUTES}
    unreadable = {a: 0 for a in ATTRIBUTES}
    for image, (color, shape) in zip(to_uint8(pixels), named):
        found = detect(image)
        for attribute in ATTRIBUTES:
            if found.unreadable(attribute):
                unreadable[attribute] += 1
            elif attribute in ("color", "shape"):
                hits[attribute] += getattr(found, attribute) == {"color": color, "shape": shape}[attribute]
            else:
                hits[attribute] += bool(getattr(found, attribute))
    rates = {
        a: hits[a] / (len(named) - unreadable[a]) if len(named) > unreadable[a] else float("nan") for a in ATTRIBUTES
    }
    return rates, unreadable


def evaluate(
    model: Session | Components,
    images: int = 200,
    batch: int = 48,
    rows: Sequence[Row] = ROWS,
    steps: int | None = None,
    scheduler: str | None = None,
    scale: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Runs every row and returns the table (fractions per attribute, targets, pass/fail)."""
    session = as_session(model)
    results = []
    started = time.monotonic()
    settings_used = None
    for row in rows:
        prompts, named = row_prompts(row, images)
        pixels = []
        for start in range(0, images, batch):
            chunk = slice(start, min(images, start + batch))
            settings = session.spec(
                tuple(prompts[chunk]),
                None if row.negative is None else [Term(row.negative)],
                rule="sd" if row.negative else "cfg",
                steps=steps,
                scheduler=scheduler,
                scale=scale,
                seeds=range(chunk.start, chunk.stop),
            )
            settings_used = settings
            pixels.append(session.run(settings).pixels)
            if on_batch is not None:
                on_batch(chunk.stop - chunk.start)
        rates, unreadable = score_images(np.concatenate(pixels), named)
        checks = {t.describe(): t.holds(rates[t.attribute]) for t in row.targets}
        results.append(
            {
                "row": row.name,
                "prompt": row.template,
                "negative": row.negative,
                "images": images,
                "rates": rates,  # over the readable images of each attribute
                "unreadable": unreadable,
                "targets": checks,
                "passed": all(checks.values()),
            }
        )
    assert settings_used is not None
    return {
        "model": session.model,
        "steps": settings_used.steps,
        "scheduler": settings_used.scheduler,
        "scale": settings_used.guidance.scale,
        "seconds": round(time.monotonic() - started, 1),
        "rows": results,
    }


def to_markdown(table: dict) -> str:
    lines = [
        f"Model `{table['model']}`, scheduler `{table['scheduler']}`, {table['steps']} steps, "
        f"scale {table['scale']}, seeds 0–{table['rows'][0]['images'] - 1} in every row "
        f"({table['seconds']:.0f} s).",
        "",
        "| row | prompt | negative | " + " | ".join(ATTRIBUTES) + " | targets | pass |",
        "|---|---|---|" + "---:|" * len(ATTRIBUTES) + "---|---|",
    ]
    for r in table["rows"]:
        rates = " | ".join(_cell(r["rates"][a], r.get("unreadable", {}).get(a, 0)) for a in ATTRIBUTES)
        targets = "; ".join(f"{name} {'✓' if ok else '✗'}" for name, ok in r["targets"].items())
        lines.append(
            f"| {r['row']} | {r['prompt']} | {r['negative'] or '—'} | {rates} | {targets} | {'yes' if r['passed'] else 'no'} |"
        )
    lines.append("")
    lines.append(
        "color and shape: the named one was found; other columns: the thing was found at all; impossible: two "
        "suns or two hats. Rates are over the "
        "images the detectors could read; images they declared unreadable (washed out, docs/detectors.md) are "
        "counted in brackets."
    )
    return "\n".join(lines) + "\n"


def _cell(rate: float, unreadable: int) -> str:
    text = "—" if np.isnan(rate) else f"{rate:.0%}"
    return text + (f" ({unreadable} unreadable)" if unreadable else "")


def write_table(table: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "evaluation.md", out_dir / "evaluation.json"
    md.write_text(to_markdown(table))
    js.write_text(json.dumps(table, indent=2) + "\n")
    return md, js
