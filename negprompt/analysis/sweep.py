"""When to switch a negative on: the start sweep, the reverse-activation probe, an automatic start.

For each (prompt, negative) and each seed, one batched run makes the plain image (no negative), the
images with the negative from step s to the end for every s in ``starts``, and the images with the
negative only in the early windows [0, k) of the probe. The steps a variant shares with the plain
image are computed once (see :func:`negprompt.sampling.loop.sample_groups`).

Scored with a region finder (:mod:`negprompt.analysis.regions`; by default the one the model
declares, on the bundled model its world's detectors), over the images whose plain version holds
the thing:

- removal rate: share of those where the windowed image no longer holds it;
- locality: SSIM and PSNR against the plain image outside the thing's region (dilated by 1 px),
  and the share of changed pixels outside it.

The best fixed start maximises removal rate × SSIM outside. The **automatic start** picks, per
image, the first step at which the positive words' attention maps have stopped moving: the mean over
the prompt's content words of 1 − cos(M_t, M_{t−1}) falls below ``tau``.
The reverse-activation probe reports how often the thing appears with an early-only negative
compared with no negative at all (Ban et al.'s "reverse activation").
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.analysis.edit import negative_word
from negprompt.analysis.locality import changed_pixels, psnr, ssim
from negprompt.analysis.regions import RegionFinder, RegionFinderError, declared_finder
from negprompt.analysis.strength import FUNCTION_WORDS, map_similarity
from negprompt.api import Generation
from negprompt.attention.capture import CaptureRequest, capture_attention
from negprompt.attention.result import plan_for
from negprompt.attention.tokens import tokenize_words
from negprompt.errors import NegpromptError
from negprompt.files import write_atomically, write_json, write_text
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window
from negprompt.jobs import StepReport, UnitBar, UnitReport
from negprompt.runsettings import RunSettings
from negprompt.runspec import RunSpec
from negprompt.session import Session, as_session

DEFAULT_TAU = 0.02


@dataclass(frozen=True)
class SweepSettings:
    pairs: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...]
    starts: tuple[int, ...]
    early_ends: tuple[int, ...] = (3, 5)
    steps: int | None = None
    scheduler: str | None = None
    scale: float | None = None
    tau: float = DEFAULT_TAU
    batch: int = 25

    def to_json(self) -> dict:
        return asdict(self)


def motion(maps: torch.Tensor) -> torch.Tensor:
    """(steps, B, S, S) maps → (steps, B): 1 − cos(M_t, M_{t−1}); step 0 gets 1 (it just appeared)."""
    change = torch.ones(maps.shape[:2])
    change[1:] = 1 - map_similarity(maps[1:], maps[:-1])
    return change


def automatic_start(word_maps: Sequence[torch.Tensor], tau: float) -> list[int]:
    """Per image, the first step t ≥ 1 where the mean motion of the words' maps is below ``tau``."""
    mean_motion = torch.stack([motion(m) for m in word_maps]).mean(dim=0)  # (steps, B)
    starts = []
    for b in range(mean_motion.shape[1]):
        below = [t for t in range(1, mean_motion.shape[0]) if float(mean_motion[t, b]) < tau]
        starts.append(below[0] if below else mean_motion.shape[0] - 1)
    return starts


def _score(finder: RegionFinder, plain: np.ndarray, other: np.ndarray, word: str) -> dict:
    region, _ = finder.find(plain, word)
    _, present = finder.find(other, word)
    outside = ~region
    return {
        "present": present,
        "ssim_outside": ssim(plain, other, outside),
        "psnr_outside": psnr(plain, other, outside),
        "changed_outside": float(changed_pixels(plain, other)[outside].mean()) if outside.any() else float("nan"),
    }


def sweep_units(settings: SweepSettings) -> list[tuple[int, tuple[int, ...]]]:
    """The sweep's units of work, in order: (pair index, a chunk of ``settings.batch`` seeds)."""
    chunks = [settings.seeds[i : i + settings.batch] for i in range(0, len(settings.seeds), settings.batch)]
    return [(index, seeds) for index in range(len(settings.pairs)) for seeds in chunks]


def sweep_unit(
    settings: SweepSettings,
    session: Session,
    finder: RegionFinder,
    pair: int,
    seeds: Sequence[int],
    report: UnitReport | None = None,
) -> list[dict]:
    """The rows of one pair over ``seeds``: one batched run of the plain image and every variant, then
    one of the automatic starts. ``report``: told both runs' progress before each UNet call
    (:meth:`negprompt.jobs.Job.report`)."""
    components = session.components
    prompt, negative = settings.pairs[pair]
    seeds = list(seeds)
    rows: list[dict] = []
    word = negative_word(negative, None)
    content = [w for w in dict.fromkeys(tokenize_words(components.tokenizer, prompt).words) if w not in FUNCTION_WORDS]
    common = RunSettings(prompt, seeds=seeds, steps=settings.steps, scheduler=settings.scheduler, scale=settings.scale)

    def negative_in(window: Window, chosen: Sequence[int] = seeds) -> RunSpec:
        """The pair's run with the negative in ``window``, for the seeds ``chosen``."""
        return session.spec_from(replace(common, negative=[Term(negative, None, window)], seeds=chosen))

    plain = session.spec_from(replace(common, rule="cfg"))  # no negative
    variants = [("start", s, negative_in(Window(s))) for s in settings.starts]
    variants += [("early", k, negative_in(Window(0, k))) for k in settings.early_ends]
    request = CaptureRequest(words={"positive": content})
    # Progress: the first run holds 1 + len(variants) groups, the second about one group's rows.
    calls, first_share = session.denoiser_calls(plain.scheduler, plain.steps), (1 + len(variants)) / (2 + len(variants))
    label = f"{prompt!r} − {negative!r}, {len(seeds)} seeds: "

    def progress(first: float, share: float, what: str) -> list:
        return [] if report is None else [StepReport(report, calls, first, share, label + what)]

    variant_hooks = progress(0.0, first_share, "variants, ")
    generations, maps = _run_variants(session, plain, [v[2] for v in variants], request, len(content), variant_hooks)
    auto = automatic_start(maps, settings.tau)
    auto_hooks = progress(first_share, 1 - first_share, "automatic starts, ")
    auto_runs = _run_automatic_starts(session, auto, seeds, negative_in, auto_hooks)
    for i, seed in enumerate(seeds):
        members, automatic = auto_runs[auto[i]]
        variant_images = [
            (kind, value, generation.pixels[i]) for (kind, value, _), generation in zip(variants, generations[1:])
        ]
        variant_images.append(("auto", auto[i], automatic.pixels[members.index(i)]))
        head = {"prompt": prompt, "negative": negative, "word": word, "seed": seed}
        rows += _image_rows(finder, head, generations[0].pixels[i], variant_images)
    return rows


def _run_variants(
    session: Session, plain: RunSpec, variants: list[RunSpec], request: CaptureRequest, words: int, hooks: list
) -> tuple[list[Generation], list[torch.Tensor]]:
    """The first pass: the plain run and every variant in one batched run, with the plain run's attention maps of
    the ``words`` content words ``request`` asks for, each (steps, B, S, S)."""
    components = session.components
    with session.exclusive():
        with capture_attention(
            components.denoiser, plan_for(plain, request, components), reduce_layer, group=0
        ) as recorder:
            generations = session.run_together([plain] + variants, unet_hooks=[recorder, *hooks])
    return generations, [recorder.tensors["maps.positive"][:, 0, :, w].float() for w in range(words)]


def _run_automatic_starts(
    session: Session,
    auto: list[int],
    seeds: list[int],
    negative_in: Callable[[Window, Sequence[int]], RunSpec],
    hooks: list,
) -> dict[int, tuple[list[int], Generation]]:
    """The second pass: one group per distinct automatic start, all in one batched run. Returns, by start, the
    indices (in ``seeds``) of the images it holds and its generation."""
    distinct = sorted(set(auto))
    members = {start: [i for i, s in enumerate(auto) if s == start] for start in distinct}
    auto_settings = [negative_in(Window(start), [seeds[i] for i in members[start]]) for start in distinct]
    automatic = session.run_together(auto_settings, unet_hooks=hooks)
    return {start: (members[start], g) for start, g in zip(distinct, automatic)}


def _image_rows(
    finder: RegionFinder, head: dict, plain: np.ndarray, variants: list[tuple[str, int, np.ndarray]]
) -> list[dict]:
    """One image's rows: the plain image's own (variant "none"), then one per (variant, start, image), each scored
    against the plain image; every row starts with ``head`` (prompt, negative, word, seed) and whether the plain
    image holds the thing."""
    word = head["word"]
    _, plain_present = finder.find(plain, word)
    row_common = {**head, "plain_present": plain_present}
    rows = [{**row_common, "variant": "none", "start": -1, **_score(finder, plain, plain, word)}]
    for kind, value, image in variants:
        rows.append({**row_common, "variant": kind, "start": value, **_score(finder, plain, image, word)})
    return rows


def run_sweep(
    settings: SweepSettings, model=None, progress: bool = True, finder: RegionFinder | None = None
) -> list[dict]:
    """One row per (pair, seed, variant) with the region finder's verdict and the locality measures.

    ``finder`` None: the one the model declares (an error if it declares none). One process; the
    command ``negprompt edit-sweep`` runs the same units as a job (:mod:`negprompt.jobs`).
    """
    session = as_session(model)
    finder = finder or sweep_finder(session)
    rows: list[dict] = []
    bar = tqdm(total=len(settings.pairs) * len(settings.seeds), unit="img", desc="edit-sweep", disable=not progress)
    units = sweep_units(settings)
    moving = UnitBar(bar)  # moves at every UNet call, not once a unit
    for number, (pair, seeds) in enumerate(units, 1):
        moving.begin(len(seeds), f"unit {number} of {len(units)}")
        rows += sweep_unit(settings, session, finder, pair, seeds, report=moving.report if progress else None)
        moving.end()
    bar.close()
    return rows


def sweep_finder(session: Session) -> RegionFinder:
    """The region finder the model declares; an error if it declares none."""
    finder = declared_finder(session.components)
    if finder is None:
        raise RegionFinderError("the start sweep scores with a region finder; this model's negprompt.json names none")
    return finder


def summarize_sweep(rows: list[dict]) -> dict:
    """Per variant: removal rate (among images whose plain version holds the thing) and locality."""

    # A finder may not read an image (present None): such images are counted, never guessed.
    def select(kind: str, start: int | None = None) -> list[dict]:
        return [
            r
            for r in rows
            if r["variant"] == kind and (start is None or r["start"] == start) and r["plain_present"] is True
        ]

    def stats(chosen: list[dict]) -> dict:
        readable = [r for r in chosen if r["present"] is not None]
        if not readable:
            return {"n": 0, "unreadable": len(chosen)}
        return {
            "n": len(readable),
            "unreadable": len(chosen) - len(readable),
            "removal_rate": float(np.mean([not r["present"] for r in readable])),
            "ssim_outside": float(np.nanmean([r["ssim_outside"] for r in chosen])),
            "psnr_outside": float(np.nanmean([min(r["psnr_outside"], 60.0) for r in chosen])),
            "changed_outside": float(np.nanmean([r["changed_outside"] for r in chosen])),
            "mean_start": float(np.mean([r["start"] for r in chosen])),
        }

    starts = sorted({r["start"] for r in rows if r["variant"] == "start"})
    fixed = {s: stats(select("start", s)) for s in starts}
    scored = {s: v["removal_rate"] * v["ssim_outside"] for s, v in fixed.items() if v["n"]}
    best = max(scored, key=scored.get) if scored else None
    seeds_total = len({(r["prompt"], r["negative"], r["seed"]) for r in rows})
    absent = [r for r in rows if r["variant"] == "none" and r["plain_present"] is False]
    appear = {}
    for k in sorted({r["start"] for r in rows if r["variant"] == "early"}):
        early = [r for r in rows if r["variant"] == "early" and r["start"] == k and r["present"] is not None]
        appear[k] = float(np.mean([r["present"] for r in early])) if early else float("nan")
    plain = [r["plain_present"] for r in rows if r["variant"] == "none"]
    readable_plain = [p for p in plain if p is not None]
    plain_rate = float(np.mean(readable_plain)) if readable_plain else float("nan")
    return {
        "images": seeds_total,
        "plain_present_rate": plain_rate,  # over the readable plain images
        "plain_unreadable": len(plain) - len(readable_plain),
        "fixed_starts": fixed,
        "best_fixed_start": best,
        "best_score": scored.get(best) if best is not None else None,
        "auto": stats(select("auto")),
        "early_only_present_rate": appear,
        "images_without_thing": len(absent),
    }


def write_sweep(rows: list[dict], summary: dict, out_dir: str | Path) -> list[Path]:
    """CSV of all rows, JSON and Markdown summaries, and the trade-off plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "sweep.csv", out / "sweep.json", out / "sweep.md", out / "sweep.png"]

    def write_csv(final: Path, temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomically([paths[0]], write_csv)
    write_json(paths[1], summary, indent=1, default=float)
    plot_sweep(summary, paths[3])
    write_text(paths[2], sweep_markdown(summary))
    return paths


def _label_groups(fixed: dict, closeness: float = 0.03) -> dict[tuple[float, float], list]:
    """The plotted starts grouped by point: a start within ``closeness`` of the plotted range (in both
    axes) of a group's first point joins that group, whose label then lists them all ("4, 8, 12")."""
    points = [(s, fixed[s]["ssim_outside"], fixed[s]["removal_rate"]) for s in fixed if fixed[s]["n"]]
    if not points:
        return {}
    span_x = (max(p[1] for p in points) - min(p[1] for p in points)) or 1.0
    span_y = (max(p[2] for p in points) - min(p[2] for p in points)) or 1.0
    groups: dict[tuple[float, float], list] = {}
    for start, x, y in points:
        near = next(
            (key for key in groups if abs(key[0] - x) <= closeness * span_x and abs(key[1] - y) <= closeness * span_y),
            (x, y),
        )
        groups.setdefault(near, []).append(start)
    return groups


def plot_sweep(summary: dict, path: Path) -> None:
    """Removal rate against locality for every fixed start (the best starred) and the automatic start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = summary["fixed_starts"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [fixed[s]["ssim_outside"] for s in fixed if fixed[s]["n"]]
    ys = [fixed[s]["removal_rate"] for s in fixed if fixed[s]["n"]]
    ax.plot(xs, ys, "o-", label="fixed start s (negative on from step s)")
    for (x, y), starts in _label_groups(fixed).items():  # starts at (nearly) one point share one label
        ax.annotate(", ".join(map(str, starts)), (x, y), fontsize=7, xytext=(7, 5), textcoords="offset points")
    best = summary["best_fixed_start"]
    if best is not None:
        ax.plot(
            [fixed[best]["ssim_outside"]],
            [fixed[best]["removal_rate"]],
            "*",
            ms=16,
            color="C3",
            label=f"best fixed start ({best})",
        )
    if summary["auto"]["n"]:
        ax.plot(
            [summary["auto"]["ssim_outside"]],
            [summary["auto"]["removal_rate"]],
            "D",
            ms=9,
            color="C2",
            label=f"automatic start (mean {summary['auto']['mean_start']:.1f})",
        )
    ax.set_xlabel("locality: SSIM to the plain image outside the thing's region")
    ax.set_ylabel("removal rate (thing gone, among images that had it)")
    ax.set_title("delayed negative: removal vs locality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_markdown(summary: dict) -> str:
    """The summary as Markdown: a row per fixed start and for the automatic start, then reverse activation."""
    fixed, best = summary["fixed_starts"], summary["best_fixed_start"]
    lines = [
        f"# Delayed negatives: start sweep on {summary['images']} images",
        "",
        f"The thing was present in {summary['plain_present_rate']:.0%} of the readable plain images "
        f"({summary['plain_unreadable']} unreadable to the region finder); rates below are among those, over the "
        "readable edited images (unreadable ones in their own column).",
        "",
        "![removal vs locality](sweep.png)",
        "",
        "| variant | images | unreadable | removal rate | SSIM outside | PSNR outside (dB, capped 60) | changed pixels outside |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s, v in fixed.items():
        if v["n"]:
            mark = " **(best)**" if s == best else ""
            lines.append(
                f"| start {s}{mark} | {v['n']} | {v['unreadable']} | {v['removal_rate']:.0%} | {v['ssim_outside']:.3f} | {v['psnr_outside']:.1f} | {v['changed_outside']:.1%} |"
            )
    auto = summary["auto"]
    if auto["n"]:
        lines.append(
            f"| automatic (mean start {auto['mean_start']:.1f}) | {auto['n']} | {auto['unreadable']} | {auto['removal_rate']:.0%} | {auto['ssim_outside']:.3f} | {auto['psnr_outside']:.1f} | {auto['changed_outside']:.1%} |"
        )
    lines += ["", "## Reverse activation: the negative only in the first steps", ""]
    lines.append(f"Thing present with no negative: {summary['plain_present_rate']:.1%} of images.")
    for k, rate in summary["early_only_present_rate"].items():
        lines.append(f"- negative only in steps [0, {k}): present in {rate:.1%} of images")
    return "\n".join(lines) + "\n"


def check_sweep_settings(settings: SweepSettings, num_steps: int) -> None:
    bad = [s for s in settings.starts if not 0 <= s < num_steps] + [
        k for k in settings.early_ends if not 1 <= k <= num_steps
    ]
    if bad:
        raise NegpromptError(f"start/early window step(s) {bad} outside the schedule of {num_steps} steps")
