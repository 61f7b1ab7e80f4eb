"""What the detectors measure on an image's object: its mask, shape, stripes and edges, hats and suns.

- the object: a mask from chroma judged per stripe phase (row mod 6), its soft coverage, and its
  contrast against its palette colour (a washed-out image reads low);
- shape: circle, square and triangle templates drawn like :func:`negprompt.shapes.scene.render`, blurred
  like the image, placed from the object's bounding box; the best fit wins;
- stripes: a lightness index per stripe phase and the period-6 sinusoid fitted to it;
- blur: the spread of the step profiles across the image's edges;
- hats and suns: separate parts of a region, and how far a region rises above the object.

Each returns a number or a mask; :func:`negprompt.shapes.detectors._features` compares them with the
thresholds of :mod:`negprompt.shapes.detector_thresholds`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from negprompt.shapes.detector_pixels import (
    _COLOR_HUES,
    _GRAY,
    _PALETTE_CHROMA,
    _ROW_PHASE,
    _STRIPE_BRIDGE,
    _border,
    _dilate,
    _erode,
    _fill_holes,
    _hue_distance,
    _label,
    _largest_component,
    _open2,
)
from negprompt.shapes.detector_thresholds import (
    EDGE_MAX_REVERSAL,
    EDGE_MIN_CONTRAST,
    EDGE_RADIUS,
    HAT_MIN_PIXELS,
    OBJECT_FLOOR_FRACTION,
    OBJECT_MIN_COVERAGE,
    OBJECT_MIN_PIXELS,
    OBJECT_ROUGH_FRACTION,
    SHAPE_BOTTOM_STEPS,
    SHAPE_SIZE_STEPS,
    STRIPE_MIN_PHASE_PIXELS,
    WASHED_MIN_CHROMA,
)
from negprompt.shapes.scene import (
    BLUR_SIGMA,
    IMAGE_SIZE,
    SHAPES,
    STRIPE_PERIOD,
    SUPERSAMPLE,
)

# ------------------------------------------------------------------ object and shape


def _object_contrast(hue: np.ndarray, chroma: np.ndarray, sun_hued: np.ndarray) -> float:
    """The most saturated non-sun pixels' chroma over the chroma of the palette color nearest their hue
    (1 for a drawn object, lower for a washed-out one); NaN when there is no such object."""
    candidates = ~sun_hued & (chroma >= WASHED_MIN_CHROMA)
    if int(candidates.sum()) < OBJECT_MIN_PIXELS:
        return float("nan")
    peak = float(np.percentile(chroma[candidates], 95))
    strongest = candidates & (chroma >= 0.8 * peak)
    names = list(_COLOR_HUES)
    distances = np.stack([_hue_distance(hue[strongest], _COLOR_HUES[n]) for n in names])
    nearest = names[int(np.bincount(distances.argmin(axis=0), minlength=len(names)).argmax())]
    return peak / _PALETTE_CHROMA[nearest]


def _count_blobs(region: np.ndarray, core: np.ndarray, min_pixels: int) -> int:
    """Separate (8-connected) parts of ``region`` holding at least ``min_pixels`` of ``core``."""
    labels, count = _label(region, diagonal=True)
    if count == 0:
        return 0
    return int((np.bincount(labels[core & region], minlength=count + 1)[1:] >= min_pixels).sum())


def _count_hats(region: np.ndarray, core: np.ndarray, obj: np.ndarray, min_rise: int) -> int:
    """Separate parts of the hat region that are hats each: enough core pixels and rising ``min_rise``
    rows above the object (a dark outline below or beside the object is a part, but no hat)."""
    labels, count = _label(region, diagonal=True)
    parts = (labels == k for k in range(1, count + 1))
    return sum(int((core & part).sum()) >= HAT_MIN_PIXELS and _rise_above(part, obj) >= min_rise for part in parts)


def _rise_above(region: np.ndarray, obj: np.ndarray) -> int:
    """Rows by which ``region``, within the object's columns, reaches above the object's top row."""
    columns = obj.any(axis=0)
    rows = np.flatnonzero((region & columns[None, :]).any(axis=1))
    return int(np.flatnonzero(obj.any(axis=1))[0] - rows[0]) if len(rows) else 0


def _phase_chroma(chroma: np.ndarray, interior: np.ndarray) -> np.ndarray:
    """Median chroma of the interior pixels in rows of each stripe phase: (6,).

    A phase without interior pixels gets the median of all of them; ``interior`` is not empty.
    """
    values, groups = chroma[interior], _ROW_PHASE[interior]
    order = np.lexsort((values, groups))
    values, groups = values[order], groups[order]
    counts = np.bincount(groups, minlength=STRIPE_PERIOD)
    starts = np.cumsum(counts) - counts
    lo = starts + np.maximum(counts - 1, 0) // 2
    hi = np.minimum(starts + counts // 2, len(values) - 1)
    out = np.full(STRIPE_PERIOD, float(np.median(values)))
    has = counts > 0
    out[has] = (values[lo[has]] + values[hi[has]]) / 2
    return out


def _object_mask(chroma: np.ndarray, own_hue: np.ndarray, reference: float) -> np.ndarray:
    """Boolean (H, W) mask of the pixels the object covers (at least OBJECT_MIN_COVERAGE).

    Light stripes halve the object's chroma, so a pixel's chroma is judged against the chroma
    of the object in rows of the same stripe phase, measured in the interior of a rough mask
    (chroma above a fraction of ``reference``, the vivid pixels' chroma).
    """
    rough = _open2(own_hue & (chroma > OBJECT_ROUGH_FRACTION * reference))
    rough &= _largest_component(_bridge_stripes(rough))
    if not rough.any():
        return rough
    interior = _erode(rough)
    full = _phase_chroma(chroma, interior if interior.any() else rough)
    mask = own_hue & (chroma >= OBJECT_MIN_COVERAGE * full[_ROW_PHASE])
    mask &= chroma > OBJECT_FLOOR_FRACTION * reference
    return _fill_holes(_largest_component(_bridge_stripes(_open2(mask))))


def _bridge_stripes(mask: np.ndarray) -> np.ndarray:
    """The mask with vertical gaps of up to STRIPE_PERIOD // 2 + 1 rows closed: a sharpened striped
    object's light rows lose their color and would cut it into bars (its convex shapes have no such gaps)."""
    return ndimage.binary_closing(mask, structure=_STRIPE_BRIDGE)


def _object_coverage(chroma: np.ndarray, own_hue: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Soft (H, W) estimate in [0, 1] of how much of each pixel the object covers.

    The chroma over the object's chroma in the same stripe phase, less the background's chroma
    (noise gives gray pixels some: max − min of noisy channels) so that gray reads 0.
    """
    interior = _erode(obj)
    full = _phase_chroma(chroma, interior if interior.any() else obj)[_ROW_PHASE]
    floor = float(np.median(_border(chroma)))
    return np.clip((chroma - floor) / np.maximum(full - floor, 1e-9), 0.0, 1.0) * own_hue


def _blur_matrix(n: int) -> np.ndarray:
    """(n, n) matrix applying scene.py's Gaussian blur (σ = BLUR_SIGMA) along one axis."""
    radius = int(np.ceil(3 * BLUR_SIGMA))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / BLUR_SIGMA) ** 2)
    offset = np.arange(n)[None, :] - np.arange(n)[:, None]
    inside = np.abs(offset) <= radius
    return np.where(inside, taps[np.clip(offset + radius, 0, 2 * radius)], 0.0) / taps.sum()


_BLUR = _blur_matrix(IMAGE_SIZE)  # a window's matrix is its top-left block (Toeplitz)
_BLUR.flags.writeable = False


def _shape_inside(shape: str, cx: float, cy: np.ndarray, s: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y) are inside a world shape (scene.py's geometry); broadcasts."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= s**2
    if shape == "square":
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":
        t = (y - (cy - s)) / (2 * s)  # upward isosceles triangle: 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= s * t)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _shape_templates(
    shape: str, cx: float, cy: np.ndarray, s: np.ndarray, rows: slice, cols: slice, blurry: bool
) -> np.ndarray:
    """Coverage (K, h, w) of the shape for K (cy, s) pairs over a window, blurred if ``blurry``.

    Drawn like scene.render draws the object: inside test on a 4× grid, area-averaged.
    """
    f = SUPERSAMPLE
    ys = (np.arange(rows.start * f, rows.stop * f) + 0.5) / f
    xs = (np.arange(cols.start * f, cols.stop * f) + 0.5) / f
    inside = _shape_inside(shape, cx, cy[:, None, None], s[:, None, None], xs[None, None], ys[None, :, None])
    k, h, w = len(cy), rows.stop - rows.start, cols.stop - cols.start
    sub = inside.view(np.uint8).reshape(k, h, f, w, f)  # area average by plain adds: fast
    row_sums = sum(sub[:, :, i] for i in range(f))
    cover = sum(row_sums[..., j] for j in range(f)) / float(f * f)
    if blurry:  # separable Gaussian blur, zero outside the window (the object is inside it)
        cover = _BLUR[:h, :h] @ cover @ _BLUR[:w, :w].T
    return cover


def _shape_scores(coverage: np.ndarray, obj: np.ndarray, care: np.ndarray, blurry: bool) -> dict[str, float]:
    """Per shape: mean |template − coverage| over cared-for pixels, best over placements.

    All three shapes span 2s × 2s around their center, so the object's bounding box gives the
    center x, the half size s and the bottom (the hat can hide the top, never the bottom); a few
    offsets of s and of the bottom absorb the box's pixel rounding and the blur's erosion.
    """
    rows = np.flatnonzero(obj.any(axis=1))
    cols = np.flatnonzero(obj.any(axis=0))
    left, right, bottom = cols[0], cols[-1] + 1, rows[-1] + 1
    cx, half = (left + right) / 2, (right - left) / 2
    ds, db = np.meshgrid(SHAPE_SIZE_STEPS, SHAPE_BOTTOM_STEPS)
    s = np.maximum(half + ds.ravel(), 1.0)
    cy = bottom + db.ravel() - s
    pad = 3
    window_rows = slice(max(0, rows[0] - pad), min(obj.shape[0], bottom + pad))
    window_cols = slice(max(0, left - pad), min(obj.shape[1], right + pad))
    target, keep = coverage[window_rows, window_cols], care[window_rows, window_cols]
    n = max(int(keep.sum()), 1)
    scores = {}
    for shape in SHAPES:
        templates = _shape_templates(shape, cx, cy, s, window_rows, window_cols, blurry)
        scores[shape] = float((np.abs(templates - target) * keep).sum(axis=(1, 2)).min() / n)
    return scores


# ------------------------------------------------------------------ stripes and blur


def _stripe_contrast(
    image: np.ndarray, color: np.ndarray, color_chroma: float, obj: np.ndarray, hat: np.ndarray
) -> float:
    """How much lighter the object's color is in some stripe phases (row mod 6) than in others.

    With g the gray background and d the unit chromatic direction of the object's measured
    ``color`` (its deviation from gray, mean removed), a pixel p has lift mean(p − g) and chroma
    ⟨p − g, d⟩. Mixing with the background scales both alike, and so does a loss of contrast
    around the gray, so their ratio, the lightness index, ignores how much of a pixel the
    object covers (edges, blur); moving the color a fraction λ towards white raises it by
    λ / (1 − λ) · (255 − g) / C, C the palette color's chroma (``color_chroma``). Per phase the
    index is a ratio of sums (linear in the pixels: noise does not bias it); the returned
    contrast is the amplitude of the period-6 sinusoid fitted to the six phases, scaled so that
    the world's sharp stripes (λ = ½ on 3 of 6 rows) read 1 and a plain object 0.
    """
    keep = obj & ~_dilate(hat, iterations=2)
    d = color - color.mean()
    lift = image[keep].mean(axis=-1) - _GRAY
    chroma = (image[keep] - _GRAY) @ (d / max(float(np.linalg.norm(d)), 1e-9))
    phase = _ROW_PHASE[keep]
    count = np.bincount(phase, minlength=STRIPE_PERIOD)
    lift_sum = np.bincount(phase, weights=lift, minlength=STRIPE_PERIOD)
    weight = np.bincount(phase, weights=chroma, minlength=STRIPE_PERIOD)
    phases = np.flatnonzero((count >= STRIPE_MIN_PHASE_PIXELS) & (weight > 0))
    if len(phases) < 4:  # three adjacent phases can all be light (or dark): no period to fit, no reading
        return float("nan")  # (the caller falls back to the whole object, or says 0)
    index, weight = lift_sum[phases] / weight[phases], weight[phases]
    angle = 2 * np.pi * phases / STRIPE_PERIOD
    design = np.stack([np.ones_like(angle), np.cos(angle), np.sin(angle)], axis=1)
    w = np.sqrt(weight)
    coef, *_ = np.linalg.lstsq(design * w[:, None], index * w, rcond=None)
    # A square wave of step 1 on 3 of 6 phases has a fundamental of amplitude 2/3.
    return float(1.5 * np.hypot(coef[1], coef[2]) * color_chroma / (255.0 - _GRAY))


def _edge_spread(image: np.ndarray) -> float:
    """Median over the image's edges of the second moment of their step profile, in px².

    Along every row and column, a step between neighbors that is larger than both adjacent
    steps and spans enough contrast across the five steps around it is an edge; its five steps,
    projected on the edge's color direction, are a profile whose spread (variance) is about
    1/12 + σ² for an edge blurred by a σ-pixel Gaussian (a little less for wide blurs, which
    the window clips). Sharp anti-aliased edges read ≈ 0.2, the world's σ = 1.2 blur ≈ 1.25.
    Profiles that are not monotone (two edges in the window, noise) are skipped. NaN: no edge.
    """
    r = EDGE_RADIUS
    spreads = []
    offsets = np.arange(-r, r + 1, dtype=np.float64)
    for img in (image, image.transpose(1, 0, 2)):
        diff = img[:, 1:] - img[:, :-1]  # (H, W−1, 3): step j goes from pixel j to j+1
        windows = np.lib.stride_tricks.sliding_window_view(diff, 2 * r + 1, axis=1)  # (H, n, 3, 5)
        size = np.linalg.norm(diff, axis=-1)
        n = windows.shape[1]
        centre = size[:, r : r + n]  # the middle step of each window
        span = windows.sum(axis=-1)  # (H, n, 3): color change across the window
        contrast = np.linalg.norm(span, axis=-1)
        peak = (centre >= size[:, r - 1 : r - 1 + n]) & (centre > size[:, r + 1 : r + 1 + n])
        peak &= contrast > EDGE_MIN_CONTRAST
        if not peak.any():
            continue
        direction = span[peak] / contrast[peak][:, None]
        profile = np.einsum("eck,ec->ek", windows[peak], direction)  # signed steps (E, 5)
        total = profile.sum(axis=1)
        mean = (profile * offsets).sum(axis=1) / total
        spread = (profile * (offsets - mean[:, None]) ** 2).sum(axis=1) / total
        monotone = (profile > -EDGE_MAX_REVERSAL * total[:, None]).all(axis=1)
        spreads.append(spread[monotone])
    spreads = np.concatenate(spreads) if spreads else np.empty(0)
    return float(np.median(spreads)) if spreads.size else float("nan")
