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
from negprompt.jobs import StepReport, UnitReport
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


def read_images(pixels: np.ndarray, named: Sequence[tuple[str, str]]) -> list[dict[str, bool | None]]:
    """Per image and attribute: found (color/shape: the named one), or None where the detectors cannot
    read the image for it (``UNREADABLE``)."""
    reads = []
    for image, (color, shape) in zip(to_uint8(pixels), named):
        found = detect(image)
        read: dict[str, bool | None] = {}
        for attribute in ATTRIBUTES:
            if found.unreadable(attribute):
                read[attribute] = None
            elif attribute in ("color", "shape"):
                read[attribute] = bool(getattr(found, attribute) == {"color": color, "shape": shape}[attribute])
            else:
                read[attribute] = bool(getattr(found, attribute))
        reads.append(read)
    return reads


def rates_of(reads: Sequence[dict[str, bool | None]]) -> tuple[dict[str, float], dict[str, int]]:
    """Per attribute: the fraction of the readable images where it is found, and how many images the
    detectors could not read for it (not counted in the fraction; NaN when none was readable)."""
    unreadable = {a: sum(r[a] is None for r in reads) for a in ATTRIBUTES}
    hits = {a: sum(r[a] is True for r in reads) for a in ATTRIBUTES}
    rates = {
        a: hits[a] / (len(reads) - unreadable[a]) if len(reads) > unreadable[a] else float("nan") for a in ATTRIBUTES
    }
    return rates, unreadable


def score_images(pixels: np.ndarray, named: Sequence[tuple[str, str]]) -> tuple[dict[str, float], dict[str, int]]:
    """:func:`rates_of` the images' :func:`read_images`."""
    return rates_of(read_images(pixels, named))


def evaluation_units(images: int, batch: int = 48, rows: Sequence[Row] = ROWS) -> list[tuple[int, int, int]]:
    """The units of work, in order: (row index, first image, end image) of ``batch`` images."""
    return [(r, start, min(images, start + batch)) for r in range(len(rows)) for start in range(0, images, batch)]


def evaluation_unit(
    session: Session,
    row: Row,
    images: int,
    start: int,
    stop: int,
    steps: int | None = None,
    scheduler: str | None = None,
    scale: float | None = None,
    report: UnitReport | None = None,
) -> dict:
    """Images [start, stop) of one row: what the detectors read in each, and the settings used.
    ``report``: told the run's progress after each step (:meth:`negprompt.jobs.Job.report`)."""
    prompts, named = row_prompts(row, images)
    settings = session.spec(
        tuple(prompts[start:stop]),
        None if row.negative is None else [Term(row.negative)],
        rule="sd" if row.negative else "cfg",
        steps=steps,
        scheduler=scheduler,
        scale=scale,
        seeds=range(start, stop),
    )
    steps = None if report is None else StepReport(report, label=f"{row.name}, images {start}–{stop - 1}: ")
    reads = read_images(session.run(settings, callback=steps).pixels, named[start:stop])
    used = {"steps": settings.steps, "scheduler": settings.scheduler, "scale": settings.guidance.scale}
    return {"reads": reads, "settings": used}


def evaluation_table(
    model: str, images: int, rows: Sequence[Row], units: Sequence[tuple[int, int, int]], payloads: Sequence[dict]
) -> dict:
    """The table (fractions per attribute, targets, pass/fail) from the units' payloads in unit order."""
    results = []
    for index, row in enumerate(rows):
        reads = [read for (r, _, _), p in zip(units, payloads) if r == index for read in p["reads"]]
        rates, unreadable = rates_of(reads)
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
    return {"model": model, **payloads[-1]["settings"], "rows": results}


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
    """Runs every row and returns the table (fractions per attribute, targets, pass/fail, seconds taken).

    One process; the command ``negprompt evaluate`` runs the same units as a job (:mod:`negprompt.jobs`)."""
    session = as_session(model)
    started = time.monotonic()
    payloads, units = [], evaluation_units(images, batch, rows)
    for r, start, stop in units:
        payloads.append(evaluation_unit(session, rows[r], images, start, stop, steps, scheduler, scale))
        if on_batch is not None:
            on_batch(stop - start)
    table = evaluation_table(session.model, images, rows, units, payloads)
    return {**table, "seconds": round(time.monotonic() - started, 1)}


def to_markdown(table: dict) -> str:
    lines = [
        f"Model `{table['model']}`, scheduler `{table['scheduler']}`, {table['steps']} steps, "
        f"scale {table['scale']}, seeds 0–{table['rows'][0]['images'] - 1} in every row"
        + (f" ({table['seconds']:.0f} s)." if "seconds" in table else "."),
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
