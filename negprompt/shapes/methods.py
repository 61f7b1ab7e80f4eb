"""``negprompt bench-methods``: every negative-prompt rule measured against ground truth.

For each negative (a thing of the bundled world) the same prompts and seeds run under every rule
in one batched loop per chunk, beside the plain image (no negative). With the detectors:

- **removal**: share of images whose plain version holds the negative's thing and whose image
  under the rule does not;
- **preservation**: share of images with the color and the shape the positive prompt named;
- **collateral**: mean absolute change, against the plain images, of the rates of the world's
  other removable things (neither prompt named them), and the share of pixels changed outside the
  thing's region (the plain image's, from the detectors);
- **cost**: UNet evaluations (branch × step) per image (NAG and VSF add attention work inside the
  positive's pass, which this count does not show: ``benchmarks/bench_attention_negatives.py`` times it).

Score for the ranking: removal × preservation × (1 − collateral attribute change), a single number
that rewards taking the thing out while keeping what was asked for and leaving the rest alone.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from negprompt.analysis.locality import changed_pixels
from negprompt.api import to_uint8
from negprompt.errors import NegpromptError
from negprompt.guidance.economy import computed_rows
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window
from negprompt.jobs import StepReport, UnitReport
from negprompt.shapes.detectors import detect
from negprompt.shapes.evaluation import Row, row_prompts
from negprompt.shapes.regions import WORLD_THINGS, detector_region

THINGS = WORLD_THINGS


@dataclass(frozen=True)
class Method:
    """A named way of using the negative prompt (``rule`` None: no negative at all)."""

    name: str
    rule: str | None
    negative_scale: float | None = None
    window: Window | None = None
    rescale: float = 0.0
    interval: Window | None = None
    settings: Mapping[str, float | str] | None = None  # the rule's options; None: its defaults


METHODS: tuple[Method, ...] = (
    Method("none (cfg)", None),
    Method("sd", "sd"),
    Method("sd, delayed 0.25:", "sd", window=Window(0.25)),
    Method("sd + rescale 0.7", "sd", rescale=0.7),
    Method("sd + interval 0:0.8", "sd", interval=Window(0, 0.8)),
    Method("dual s⁻ = s", "dual", negative_scale=None),  # s⁻ filled with s below
    Method("perp-neg", "perp-neg", negative_scale=1.0),
    Method("dng λ=5", "dng"),
    Method("apg η=0", "apg"),
    Method("nag φ=5", "nag"),  # inside attention: the negative is no denoiser row
    Method("vsf λ=4", "vsf"),
    # diffusers' guiders through rule `guider`, the negative as their pred_uncond (docs/guiders.md); FDG: low
    # frequencies at the bench's scale 5, high ones at half of it (diffusers' default ratio), through kornia
    Method("guider TCFG", "guider", settings={"name": "TangentialClassifierFreeGuidance"}),
    Method(
        "guider FDG 5/2.5",
        "guider",
        settings={"name": "FrequencyDecoupledGuidance", "config": '{"guidance_scales": [5.0, 2.5]}'},
    ),
    Method("guider MAMBO-G α=8", "guider", settings={"name": "MagnitudeAwareGuidance"}),
    Method("guider APG-Mix", "guider", settings={"name": "AdaptiveProjectedMixGuidance"}),
    # cheap negatives (docs/cheap-negatives.md): the negative's branch ended where its effect has converged,
    # or computed every K-th step with its difference reused in between
    Method("sd, auto end", "sd", window=Window(0, "auto")),
    Method("sd, every 2", "sd", window=Window(0, None, 2)),
    Method("sd, every 3", "sd", window=Window(0, None, 3)),
    Method("dual s⁻ = s, auto end", "dual", window=Window(0, "auto")),
    Method("dual s⁻ = s, every 2", "dual", window=Window(0, None, 2)),
    Method("dual s⁻ = s, every 3", "dual", window=Window(0, None, 3)),
)


def _negative_terms(method: Method, negative: str, scale: float) -> list[Term] | None:
    if method.rule is None:
        return None
    own = method.negative_scale
    if method.rule == "dual" and own is None:
        own = scale
    window = method.window or Window()
    if method.rule == "sd" and scale == 1 and window.economical:
        window = Window(window.start)  # sd at scale 1 computes no negative branch: nothing to end or reuse
    return [Term(negative, own, window)]


def _read(found, attribute: str, named: str | None = None) -> bool | None:
    """Whether ``attribute`` was found (color, shape: is the ``named`` one), or None where the detectors
    cannot read the image for it."""
    if found.unreadable(attribute):
        return None
    value = getattr(found, attribute)
    return value == named if named is not None else bool(value)


def _measure(pixels: np.ndarray, named: Sequence[tuple[str, str]], plain: np.ndarray, word: str) -> list[dict]:
    rows = []
    for image, reference, (color, shape) in zip(pixels, plain, named):
        found = detect(to_uint8(image))
        region, _ = detector_region(reference, word)
        outside = ~region
        changed = changed_pixels(reference, image)
        rows.append(
            {
                "color_ok": _read(found, "color", color),
                "shape_ok": _read(found, "shape", shape),
                **{thing: _read(found, thing) for thing in THINGS},
                "changed_outside": float(changed[outside].mean()) if outside.any() else float(changed.mean()),
            }
        )
    return rows


@dataclass(frozen=True)
class BenchSettings:
    """What a method benchmark runs: every method on ``images`` prompts and seeds per negative."""

    negatives: tuple[str, ...] = ("a hat", "a sun", "striped", "blurry")
    images: int = 200
    steps: int | None = None
    scheduler: str | None = None
    scale: float | None = None  # None: the model's default
    batch: int = 24

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchSettings:
        return cls(**{**data, "negatives": tuple(data["negatives"])})

    def check(self) -> None:
        for negative in self.negatives:
            if negative.split()[-1] not in THINGS:
                raise NegpromptError(
                    f"negative {negative!r}: bench-methods scores the world's things: {', '.join(THINGS)}"
                )

    def units(self) -> list[tuple[int, int, int]]:
        """The units of work, in order: (negative index, first image, end image) of ``batch`` images."""
        return [
            (n, start, min(self.images, start + self.batch))
            for n in range(len(self.negatives))
            for start in range(0, self.images, self.batch)
        ]


def bench_unit(
    settings: BenchSettings,
    session,
    negative: int,
    start: int,
    stop: int,
    methods: Sequence[Method] = METHODS,
    report: UnitReport | None = None,
) -> dict:
    """Every method on images [start, stop) of one negative, in one batched run: per method the
    measures of each image and the UNet rows the method needs alone. ``report``: told the run's
    progress before each UNet call (:meth:`negprompt.jobs.Job.report`)."""
    text = settings.negatives[negative]
    word = text.split()[-1]
    scale = settings.scale if settings.scale is not None else float(session.defaults["scale"])
    prompts, named = row_prompts(Row("bench", "a {color} {shape}"), settings.images)
    specs = [
        session.spec(
            tuple(prompts[start:stop]),
            _negative_terms(method, text, scale),
            rule=method.rule or "cfg",
            steps=settings.steps,
            scheduler=settings.scheduler,
            scale=scale,
            seeds=range(start, stop),
            rescale=method.rescale,
            interval=method.interval,
            rule_settings=method.settings,
        )
        for method in methods
    ]
    calls = session.denoiser_calls(specs[0].scheduler, specs[0].steps)
    label = f"{text}, images {start}–{stop - 1}, {len(methods)} methods: "
    hooks = [StepReport(report, calls, label=label)] if report is not None else []
    generations = session.run_together(specs, unet_hooks=hooks)
    plain = generations[0].pixels
    return {
        "measures": {m.name: _measure(g.pixels, named[start:stop], plain, word) for m, g in zip(methods, generations)},
        "unet_rows": {
            m.name: _rows_alone(spec, g.num_steps, g.negative_stops) for m, spec, g in zip(methods, specs, generations)
        },
    }


def summarize_bench(
    settings: BenchSettings, payloads: Sequence[dict], methods: Sequence[Method] = METHODS
) -> list[dict]:
    """One record per (negative, method) from the units' payloads (in unit order)."""
    records = []
    for n, negative in enumerate(settings.negatives):
        mine = [p for (index, _, _), p in zip(settings.units(), payloads) if index == n]
        per_method = {m.name: [row for p in mine for row in p["measures"][m.name]] for m in methods}
        base = per_method[methods[0].name]
        for method in methods:
            rows = sum(p["unet_rows"][method.name] for p in mine)
            records.append(
                _summarize(
                    method.name, negative, negative.split()[-1], per_method[method.name], base, rows / settings.images
                )
            )
    return records


def _rows_alone(settings, num_steps: int, negative_stops: Mapping[str, int | None] | None = None) -> int:
    """UNet rows the settings need when run alone: Σ over steps of branches × images (negatives computed
    every K-th step or ended at auto counted where they were computed)."""
    return computed_rows(settings.guidance, num_steps, negative_stops) * len(settings.seeds)


def _rate(values: Sequence[bool | None]) -> float:
    """Mean over the readable values (None: the detectors could not read that image); NaN if none is."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else float("nan")


def _summarize(name: str, negative: str, word: str, rows: list[dict], base: list[dict], unet_per_image: float) -> dict:
    had = [i for i, r in enumerate(base) if r[word] is True]
    removal = _rate([None if rows[i][word] is None else not rows[i][word] for i in had])
    both = [None if r["color_ok"] is None or r["shape_ok"] is None else r["color_ok"] and r["shape_ok"] for r in rows]
    preservation = _rate(both)
    others = [t for t in THINGS if t != word]
    collateral = float(np.nanmean([abs(_rate([r[t] for r in rows]) - _rate([r[t] for r in base])) for t in others]))
    changed = float(np.mean([r["changed_outside"] for r in rows]))
    return {
        "negative": negative,
        "method": name,
        "images": len(rows),
        "unreadable": sum(any(r[k] is None for k in ("color_ok", "shape_ok", word)) for r in rows),
        "had_thing": len(had),
        "present_rate": _rate([r[word] for r in rows]),
        "removal": removal,
        "color": _rate([r["color_ok"] for r in rows]),
        "shape": _rate([r["shape_ok"] for r in rows]),
        "preservation": preservation,
        "collateral_attributes": collateral,
        "changed_outside": changed,
        "unet_per_image": unet_per_image,
        "score": (0.0 if np.isnan(removal) else removal) * preservation * (1 - collateral),
    }


def _mean_of_known(values: Sequence[float]) -> float:
    """Mean over the values that are not NaN; NaN when none is (e.g. no image had the thing to remove)."""
    known = [v for v in values if not np.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


def ranking(records: list[dict]) -> list[dict]:
    """Mean over negatives per method, best score first."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    keys = ("removal", "preservation", "collateral_attributes", "changed_outside", "unet_per_image", "score")
    table = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        table.append({"method": method, **{k: _mean_of_known([r[k] for r in mine]) for k in keys}})
    return sorted(table, key=lambda r: -r["score"])


def write_results(records: list[dict], out_dir: str | Path, settings: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "methods.csv", out / "methods.json", out / "methods.md", out / "methods.png"]
    with open(paths[0], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    ranked = ranking(records)
    paths[1].write_text(json.dumps({"settings": settings, "ranking": ranked, "cells": records}, indent=1) + "\n")
    lines = [
        "# Negative-prompt methods, measured on the bundled shapes world",
        "",
        f"Settings: {', '.join(f'{k} {v}' for k, v in settings.items())}. Every cell uses the same prompts "
        "(all color × shape combinations) and seeds; the plain image is the reference. Rates are over the images "
        "the detectors could read (unreadable ones, washed out, are counted apart). Score = removal × "
        "preservation × (1 − collateral attribute change); see `negprompt/shapes/methods.py`.",
        "",
        "## Ranking (mean over negatives)",
        "",
        "| rank | method | removal | preservation | collateral attr. | changed px outside | UNet evals / image | score |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(ranked, 1):
        lines.append(
            f"| {i} | {r['method']} | {r['removal']:.0%} | {r['preservation']:.0%} | {r['collateral_attributes']:.1%} | "
            f"{r['changed_outside']:.1%} | {r['unet_per_image']:.1f} | {r['score']:.3f} |"
        )
    lines += [
        "",
        "## Per negative",
        "",
        "| negative | method | unreadable | had it | present | removal | color | shape | collateral | changed px | score |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['negative']} | {r['method']} | {r['unreadable']} | {r['had_thing']} | {r['present_rate']:.0%} | {r['removal']:.0%} | {r['color']:.0%} | "
            f"{r['shape']:.0%} | {r['collateral_attributes']:.1%} | {r['changed_outside']:.1%} | {r['score']:.3f} |"
        )
    lines += ["", "![removal vs preservation](methods.png)", ""]
    paths[2].write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ranked:
        ax.scatter(r["preservation"], r["removal"], s=20 + 8 * r["unet_per_image"])
        ax.annotate(
            r["method"], (r["preservation"], r["removal"]), fontsize=7, xytext=(4, 2), textcoords="offset points"
        )
    ax.set_xlabel("preservation (named color and shape kept)")
    ax.set_ylabel("removal (thing gone, among images that had it)")
    ax.set_title("methods: mean over negatives (marker size ~ UNet evaluations per image)")
    fig.tight_layout()
    fig.savefig(paths[3], dpi=120)
    plt.close(fig)
    return paths
