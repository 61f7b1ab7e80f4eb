"""Delayed negative prompts as local edits (the article: a negative switched on after the first steps
removes a thing and keeps the rest).

:func:`run_edit` generates, in one batched run, the image without the negative, with the negative
over all steps, and with the negative in a window [start, end); the first steps of the windowed
image are the plain image's own, computed once. Each edit is scored:

- **region** of the thing: from the region finder the model declares (:mod:`negprompt.analysis.regions`;
  the bundled model's finder uses its world's ground-truth detectors), in the plain image; otherwise
  the negative word's attention map in the full-negative run, averaged over the window's steps,
  divided by its maximum and thresholded (``threshold``);
- **locality**: PSNR and SSIM against the plain image outside the region, and the share of changed
  pixels (:mod:`negprompt.analysis.locality`);
- **removal**: with a region finder, whether it still finds the thing; otherwise an attention
  score, 1 − (negative word's attention inside the region at the last step ÷ its peak over the
  window), which grows as the thing fades (the article: once removed, its map weakens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.analysis.locality import locality
from negprompt.analysis.regions import RegionFinder, declared_finder
from negprompt.api import Generation, to_uint8
from negprompt.attention.capture import CapturePlan, CaptureRequest, capture_attention
from negprompt.attention.result import plan_for
from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Term
from negprompt.guidance.windows import Window
from negprompt.models.components import Components
from negprompt.runsettings import RunSettings
from negprompt.runspec import RunSpec
from negprompt.session import Session, as_session

REGION_SOURCES = ("auto", "attention", "detector")


class EditError(NegpromptError):
    """Edit settings that cannot run."""


@dataclass
class EditImage:
    """One seed's three images (H, W, 3 in [0, 1]), the region and the measures."""

    seed: int
    original: np.ndarray
    full: np.ndarray
    edited: np.ndarray
    region: np.ndarray
    measures: dict = field(default_factory=dict)


@dataclass
class EditOutcome:
    images: list[EditImage]
    generations: list[Generation]  # plain, full, windowed
    region_source: str
    word: str
    window: tuple[int, int]
    unet_batch_rows: int
    num_steps: int


def negative_word(negative: str, word: str | None) -> str:
    words = negative.lower().split()
    if word is None:
        content = [w for w in words if w not in {"a", "an", "the", "and", "with", "of"}] or words
        return content[-1]
    if word.lower() not in words:
        raise EditError(
            f"word {word!r} is not a word of the negative prompt {negative!r}; its words: {', '.join(words)}"
        )
    return word.lower()


def _check_threshold(threshold: float) -> None:
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        raise EditError(f"mask threshold must be in (0, 1), got {threshold!r}")


def region_source_for(
    components: Components, word: str, requested: str, size: tuple[int, int]
) -> tuple[str, RegionFinder | None]:
    """``"detector"`` with the model's region finder, or ``"attention"`` with None, for ``requested``.

    ``auto`` takes the finder the model declares when it covers ``word`` in images of ``size`` =
    (height, width), else attention.
    """
    if requested not in REGION_SOURCES:
        raise EditError(f"unknown region source {requested!r}; choose one of {', '.join(REGION_SOURCES)}")
    if requested == "attention":
        return "attention", None
    finder = declared_finder(components)
    if finder is None:
        if requested == "detector":
            raise EditError(
                "detector regions exist only for the bundled world and models whose negprompt.json names a "
                "region finder; this model names none"
            )
        return "attention", None
    if finder.covers(components, word, size):
        return "detector", finder
    if requested == "detector":
        raise EditError(f"detector regions exist only for {finder.domain}'s things ({', '.join(finder.things)})")
    return "attention", None


def attention_region(
    maps: torch.Tensor, present: torch.Tensor, window: tuple[int, int], threshold: float, size: tuple[int, int]
) -> np.ndarray:
    """Mean map over the window's evaluated steps, ÷ its max, > threshold, at image size: (B, H, W) bool."""
    start, end = window
    steps = [s for s in range(start, end) if bool(present[s])]
    mean = maps[steps].mean(dim=0)  # (B, S, S)
    peak = mean.flatten(1).max(dim=1).values.clamp_min(1e-12)
    normalised = mean / peak[:, None, None]
    up = torch.nn.functional.interpolate(normalised[:, None], size=size, mode="nearest")[:, 0]
    return (up > threshold).numpy()


def attention_removal(
    maps: torch.Tensor, present: torch.Tensor, region: np.ndarray, window: tuple[int, int]
) -> np.ndarray:
    """1 − (mass inside the region at the window's last step ÷ its peak over the window), per image."""
    start, end = window
    steps = [s for s in range(start, end) if bool(present[s])]
    size = maps.shape[-1]
    small = torch.nn.functional.interpolate(
        torch.from_numpy(region[:, None].astype(np.float32)), size=(size, size), mode="nearest"
    )[:, 0]
    inside = (maps[steps] * small[None]).flatten(2).sum(-1)  # (steps, B)
    peak = inside.max(dim=0).values.clamp_min(1e-12)
    return (1 - inside[-1] / peak).numpy()


def _run_with_attention(
    session: Session,
    specs: tuple[RunSpec, RunSpec, RunSpec],
    plans: tuple[CapturePlan, CapturePlan],
    bounds: tuple[int, int],
    threshold: float,
    progress: bool,
) -> tuple[list[Generation], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain, full and windowed runs with the negative's maps captured in the last two; returns the
    generations, each image's region from the full run's maps (B, H, W) and the removal scores (B,)
    of the full and the windowed negative."""
    components = session.components
    plan_full, plan_windowed = plans
    with session.exclusive():
        with capture_attention(components.denoiser, plan_full, reduce_layer, group=1) as record_full:
            with capture_attention(components.denoiser, plan_windowed, reduce_layer, group=2) as record_windowed:
                generations = session.run_together(
                    list(specs), unet_hooks=[record_full, record_windowed], progress=progress
                )
    maps_full = record_full.tensors["maps.negative"][:, 0, :, 0].float()  # (steps, B, S, S)
    maps_windowed = record_windowed.tensors["maps.negative"][:, 0, :, 0].float()
    present_full = record_full.tensors["present.negative"]
    present_windowed = record_windowed.tensors["present.negative"]
    hw = generations[0].pixels.shape[1:3]
    regions = attention_region(maps_full, present_full, bounds, threshold, hw)
    removal_full = attention_removal(maps_full, present_full, regions, (0, plan_full.num_steps))
    removal_windowed = attention_removal(maps_windowed, present_windowed, regions, bounds)
    return generations, regions, removal_full, removal_windowed


def run_edit(
    prompt: str,
    negative: str,
    window: Window,
    seeds: Sequence[int],
    *,
    word: str | None = None,
    threshold: float = 0.5,
    region: str = "auto",
    model: str | Components | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    scale: float | None = None,
    size: int | None = None,
    progress: bool = False,
    max_rows_per_call: int | None = None,
) -> EditOutcome:
    """Plain, full-negative and windowed-negative images in one batched run, with their measures.

    Attention maps are recorded only when the region comes from attention; with the model's region
    finder (the detectors, on the bundled model) the run is the three generations alone, and
    ``max_rows_per_call`` may split each step's UNet call (see :func:`negprompt.sampling.loop.sample_groups`).
    """
    _check_threshold(threshold)
    word = negative_word(negative, word)
    session = as_session(model)
    components = session.components
    common = RunSettings(prompt, seeds=seeds, steps=steps, scheduler=scheduler, scale=scale, size=size)
    plain = session.spec_from(replace(common, rule="cfg"))  # no negative
    full = session.spec_from(replace(common, negative=[Term(negative)]))
    windowed = session.spec_from(replace(common, negative=[Term(negative, None, window)]))
    source, finder = region_source_for(components, word, region, (plain.height, plain.width))
    request = CaptureRequest(words={"negative": [word]})
    plan_full = plan_for(full, request, components)  # also checks the word and the window early
    bounds = window.resolve(plan_full.num_steps)
    plan_windowed = plan_for(windowed, request, components)
    if max_rows_per_call is not None and source != "detector":
        raise EditError("rows per UNet call can be limited only with the detector region (bundled model)")
    if max_rows_per_call is not None and max_rows_per_call < 1:
        raise EditError(f"rows per UNet call must be a positive number, got {max_rows_per_call}")
    if source == "detector":  # the detectors give region and removal: no attention maps needed
        specs = [replace(spec, rows_per_call=max_rows_per_call) for spec in (plain, full, windowed)]
        generations = session.run_together(specs, progress=progress)
        images = _detector_images(plain.seeds, generations, finder, word)
    else:
        generations, regions, removal_full, removal_windowed = _run_with_attention(
            session, (plain, full, windowed), (plan_full, plan_windowed), bounds, threshold, progress
        )
        images = _attention_images(plain.seeds, generations, regions, removal_full, removal_windowed)
    return EditOutcome(
        images, generations, source, word, bounds, generations[0].unet_batch_rows, generations[0].num_steps
    )


def _detector_images(
    seeds: Sequence[int], generations: Sequence[Generation], finder: RegionFinder, word: str
) -> list[EditImage]:
    """Each seed's plain, full and windowed images measured by the model's region finder: ``word``'s region in the
    plain image, whether the finder finds the thing in each image, and the locality (see :func:`_edit_image`)."""
    images = []
    for i, seed in enumerate(seeds):
        original, with_full, edited = (g.pixels[i] for g in generations)
        mask, in_original = finder.find(original, word)
        _, in_full = finder.find(with_full, word)
        _, in_edited = finder.find(edited, word)
        measures = dict(present_original=in_original, present_full=in_full, present_edited=in_edited)
        images.append(_edit_image(seed, original, with_full, edited, mask, measures))
    return images


def _attention_images(
    seeds: Sequence[int],
    generations: Sequence[Generation],
    regions: np.ndarray | torch.Tensor,
    removal_full: np.ndarray | torch.Tensor,
    removal_windowed: np.ndarray | torch.Tensor,
) -> list[EditImage]:
    """Each seed's plain, full and windowed images measured by attention: its region from the full run's maps
    (B, H, W), the removal scores (B,) of the full and the windowed negative, and the locality."""
    images = []
    for i, seed in enumerate(seeds):
        original, with_full, edited = (g.pixels[i] for g in generations)
        measures = dict(removal_score_full=float(removal_full[i]), removal_score_edited=float(removal_windowed[i]))
        images.append(_edit_image(seed, original, with_full, edited, regions[i], measures))
    return images


def _edit_image(
    seed: int, original: np.ndarray, with_full: np.ndarray, edited: np.ndarray, region: np.ndarray, measures: dict
) -> EditImage:
    """One seed's images with ``measures`` and then the locality, outside ``region``, of the edited (windowed) image
    and of the full-negative one against the plain image (:func:`~negprompt.analysis.locality.locality`)."""
    measures = {**measures, "edited": locality(original, edited, region), "full": locality(original, with_full, region)}
    return EditImage(seed, original, with_full, edited, region, measures)


def comparison_figure(outcome: EditOutcome, zoom: int | None = None):
    """Rows: seeds; columns: plain, full negative, windowed negative, |full − plain|, |windowed − plain|, region."""
    from PIL import Image, ImageDraw

    h, w = outcome.images[0].original.shape[:2]
    zoom = zoom or max(1, 128 // max(h, w))
    cell_h, cell_w, header = h * zoom, w * zoom, 20
    titles = [
        "no negative",
        "negative, all steps",
        f"negative in [{outcome.window[0]}, {outcome.window[1]})",
        "|all - none|",
        "|window - none|",
        "region",
    ]
    canvas = Image.new("RGB", (len(titles) * (cell_w + 4), header + len(outcome.images) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * (cell_w + 4) + 2, 4), title, fill="black")
    for r, item in enumerate(outcome.images):
        diff_full = np.abs(item.full - item.original).max(axis=-1)
        diff_edit = np.abs(item.edited - item.original).max(axis=-1)
        cells = [
            item.original,
            item.full,
            item.edited,
            np.repeat(diff_full[..., None], 3, -1),
            np.repeat(diff_edit[..., None], 3, -1),
            np.repeat(item.region[..., None].astype(float), 3, -1),
        ]
        for c, cell in enumerate(cells):
            tile = Image.fromarray(to_uint8(np.clip(cell, 0, 1))).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (c * (cell_w + 4), header + r * (cell_h + 4)))
    return canvas


def summarize(outcome: EditOutcome) -> dict:
    """Means over seeds of the measures, plus the cost."""

    def mean(path: list[str]) -> float:
        values = []
        for item in outcome.images:
            value = item.measures
            for key in path:
                value = value[key]
            values.append(float("nan") if value is None else float(value))  # None: the finder could not read it
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    summary = {
        "word": outcome.word,
        "window": list(outcome.window),
        "region_source": outcome.region_source,
        "seeds": [item.seed for item in outcome.images],
        "unet_batch_rows": outcome.unet_batch_rows,
        "unet_batch_rows_if_separate": 3 * 2 * outcome.num_steps * len(outcome.images),
    }
    for variant in ("edited", "full"):
        for key in ("psnr_outside", "ssim_outside", "changed_fraction", "changed_outside_fraction"):
            summary[f"{variant}_{key}"] = mean([variant, key])
    if outcome.region_source == "detector":
        for variant in ("original", "full", "edited"):
            summary[f"present_{variant}"] = mean([f"present_{variant}"])  # over the readable images
            summary[f"unreadable_{variant}"] = sum(i.measures[f"present_{variant}"] is None for i in outcome.images)
    else:
        summary["removal_score_full"] = mean(["removal_score_full"])
        summary["removal_score_edited"] = mean(["removal_score_edited"])
    return summary
