"""Detectors that read a shapes-world image's attributes back from its pixels.

They score a text-to-image model's samples: which shape and color it drew, and whether it drew
a hat, a sun, stripes or a blur. Model samples are imperfect (noisy, colors a bit off, soft
edges, small artifacts), so pixels are compared with the background or with the object rather
than with exact palette values, and every count has a margin.

Steps for one (32, 32, 3) image:

1. background: the border's median color is moved onto the world's gray by a per-channel
   offset (undoes a global color shift); the hat is also looked for after a per-channel gain
   instead (undoes a global color scaling);
2. hat: near-black, colorless pixels (colorless, so dark colored things are never taken for it)
   whose region rises at least HAT_MIN_RISE rows above the object (a dark outline around the
   object, as over-sharpening models draw, does not);
3. sun: bright, saturated pixels of the sun's hue;
4. blurry: the median spread (second moment) of the step profiles across the image's edges;
5. color: majority hue of the bright saturated pixels that are not the sun's;
6. object: pixels of the object's hue whose chroma (max − min channel) is at least
   ``OBJECT_MIN_COVERAGE`` of the object's chroma in rows of the same stripe phase (light
   stripes halve the chroma); largest connected component, holes filled;
7. shape: the circle, square or triangle template, placed from the object's bounding box and
   blurred like the image, that best matches the object's coverage (hat and sun pixels ignored);
8. striped: how much lighter the object's color is in some stripe phases (row mod 6) than in
   others, measured by an index that ignores how much of each pixel the object covers;
9. unreadable: in a washed-out image (the object's chroma below MIN_OBJECT_CONTRAST of its palette
   color's) color, shape, hat and stripes are :data:`UNREADABLE` rather than guessed.

The stress suite (``negprompt/shapes/stress.py``, docs/detectors.md) checks every rule on rendered
scenes perturbed the way model images look.

``detect`` returns a :class:`Detection`; ``_features`` also returns the measured quantities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from negprompt.shapes.scene import (
    BACKGROUND,
    BLUR_SIGMA,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    STRIPE_PERIOD,
    SUN_COLOR,
    SUPERSAMPLE,
)

# ------------------------------------------------------------------ thresholds
# Chosen from the distributions of each measured quantity over 1,000 rendered scenes, clean,
# with Gaussian pixel noise (σ = 6), with a global color shift (±15 per channel) and with both;
# the ranges quoted are over those four conditions. Each threshold lies inside the gap between
# the classes it separates, leaning towards where a model's imperfections push the class it
# would otherwise lose (soft edges, muted colors). Pixel values are 0–255, after the background
# correction.

BACKGROUND_SHIFT_LIMIT = 40.0  # largest per-channel offset (or gain × 200) the correction undoes

HAT_MAX_VALUE = 100.0  # hat core: max channel below this (hat 25, blurred core ≤ ~45; objects
# ≥ 170; leaves room for a hat drawn dark gray, e.g. at 70 % contrast)
HAT_MAX_CHROMA = 40.0  # ... and channel spread below this (colorless: noise σ 6 gives ≤ ~20,
# a ±15 cast ≤ 30; dark saturated colors, e.g. navy (5, 10, 60), stay out)
HAT_MIN_PIXELS = 6  # core pixels: with a hat 20–43 (a hat covers ~40 pixels), without one 0
HAT_MIN_RISE = 5  # with an object, the dark region must reach this many rows above its top, over
# its columns: hats 4–16 (≥ 5 in 645 of 648 stress images), dark outlines of 1–2 px 1–4
# (docs/detectors.md)
HAT_MIN_RISE_BLURRY = 2  # in a blurry image: the bundled model's hats on blurred squares rise 3–4 (the audit)
HAT_REGION_MAX_VALUE = 130.0  # region: core + connected pixels below this (≈ half-way from the
# hat to the object or the gray; swept 100–160 for the best IoU with the true region)

SUN_HUE_TOLERANCE = 20.0  # degrees around the sun's hue (≈ 51°); nearest object hue: red, 0°
SUN_MIN_CHROMA = 80.0  # sun core: saturated (sun 210) ...
SUN_MIN_VALUE = 150.0  # ... and bright (sun 250)
SUN_MIN_PIXELS = 6  # core pixels: with a sun 32–37 (the disc covers ~34 pixels), without one 0
SUN_REGION_FRACTION = 0.5  # region: sun-hued pixels with half the core's chroma (half covered)

COLOR_MIN_CHROMA = 80.0  # color vote: saturated (object colors 130–185, light stripes 65–92) ...
COLOR_MIN_VALUE = 150.0  # ... and bright pixels (object colors' max channel ≥ 170)
COLOR_MIN_PIXELS = 10  # fewer voters: no object (the world's objects give ≥ 30)

OBJECT_HUE_TOLERANCE = 45.0  # degrees from the object's hue (object hues are ≥ 50° apart)
OBJECT_ROUGH_FRACTION = 0.3  # rough object: chroma above this fraction of the vivid pixels'
OBJECT_MIN_COVERAGE = 0.4  # object: chroma ≥ this fraction of its stripe phase's (edge pixels
# come in quarter steps of coverage; 0.4 keeps the half-covered ones the truth counts as object)
OBJECT_FLOOR_FRACTION = 0.15  # ... and above this fraction of the vivid pixels' (noise floor)
OBJECT_MIN_PIXELS = 20  # smaller: no object, no shape, no color (the world's objects give ≥ 69)

SHAPE_SIZE_STEPS = (-1.0, -0.5, 0.0, 0.5)  # template half-size offsets from the box's half width
SHAPE_BOTTOM_STEPS = (-1.0, -0.5, 0.0, 0.5)  # template bottom offsets from the box's bottom
# (all are used; the true shape's template fits best by ≥ 0.004 mean |Δcoverage|, median ~0.04)

STRIPE_MIN_PHASE_PIXELS = 4  # a stripe phase's rows need this many object pixels to count
STRIPE_MIN_CONTRAST = 0.2  # see _stripe_contrast: striped 0.34–1.11 (blurred ones lowest),
# plain 0–0.13 (noise); ≈ the geometric mean of the two bounds
STRIPE_MIN_CONTRAST_SHARP = 0.6  # in a sharp image: rendered stripes read ≥ 0.75 there (one of 200
# colour-gain scenes 0.39–0.6), the model's real stripes 1.7–4.6, while the row-by-row lightness of an
# over-sharpened plain object (halos, a light band under the brim) read 0.22–0.56 (the audit of the
# negative "blurry", docs/audit/first-model/audit.md)

EDGE_RADIUS = 2  # an edge's profile: the 2·2 + 1 steps around its largest (stripes are 3 px)
EDGE_MIN_CONTRAST = 60.0  # an edge: color distance across its profile above this (≥ 70 here)
EDGE_MAX_REVERSAL = 0.1  # profile steps against the edge's direction: at most this × contrast
# (looser lets stripe double edges in: blurred images then read as low as 0.03)
MIN_OBJECT_CONTRAST = 0.565  # the object's chroma over its palette color's (_object_contrast): below,
# the image is washed out beyond what the detectors were validated on, and color, shape, hat and
# stripes are UNREADABLE. Stress suite: clean 0.82–1, blur σ 1.6 ≥ 0.67, colour gains ≥ 0.72, 30 %
# towards gray 0.575–0.70 (read), 45 % towards gray 0.45–0.554 (unreadable) (docs/detectors.md)
WASHED_MIN_CHROMA = 30.0  # pixels with at least this chroma may be a washed-out object
BLURRY_MIN_EDGE_SPREAD = 0.9  # px², see _edge_spread: sharp 0–0.67 (0.74 with noise σ 10),
# blurred (σ 1.2) 0.95–1.49; sharp images softened by σ 0.5 read ≤ 0.78, by σ 0.7 ≤ 0.88
# (≤ 1.1 with noise σ 6: the one overlap, ~5 % of those called blurry)


ATTRIBUTES = ("shape", "color", "hat", "sun", "striped", "blurry", "impossible")


class _Unreadable:
    """What a detector answers where the image lies outside what it was validated on."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNREADABLE"

    def __bool__(self) -> bool:
        raise TypeError("an unreadable attribute is neither true nor false; test `is UNREADABLE` first")


UNREADABLE = _Unreadable()


@dataclass(frozen=True)
class Detection:
    """The attributes read from one image and the region of each noun (bool (32, 32) masks).

    Each attribute may be :data:`UNREADABLE` where the image lies outside what the detectors were
    validated on (a washed-out image: color, shape, hat and stripes); tables count those apart.
    ``regions`` has "object" (its visible pixels: not those under the hat), "hat" and "sun";
    a mask is empty when its thing is absent.
    """

    shape: str | None | _Unreadable
    color: str | None | _Unreadable
    hat: bool | _Unreadable
    sun: bool | _Unreadable
    striped: bool | _Unreadable
    blurry: bool | _Unreadable
    regions: dict[str, np.ndarray] = field(repr=False, compare=False)
    suns: int | _Unreadable = 0  # separate sun discs
    hats: int | _Unreadable = 0  # separate hats

    @property
    def impossible(self) -> bool | _Unreadable:
        """A scene the world never draws: two suns or two hats (UNREADABLE if the hats cannot be read
        and there are not two suns)."""
        if self.suns is not UNREADABLE and self.suns >= 2:
            return True
        if self.hats is UNREADABLE or self.suns is UNREADABLE:
            return UNREADABLE
        return self.hats >= 2

    def to_json(self) -> dict:
        """The attribute values (no masks), JSON-ready; an unreadable one is "unreadable"."""
        return {name: "unreadable" if self.unreadable(name) else getattr(self, name) for name in ATTRIBUTES}

    def unreadable(self, attribute: str) -> bool:
        return getattr(self, attribute) is UNREADABLE


# ------------------------------------------------------------------ helpers


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), chroma (max − min) and value (max) of an (..., 3) float image."""
    mx = image.max(axis=-1)
    chroma = mx - image.min(axis=-1)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return hue * 60.0, chroma, mx


def _hue_distance(hue: np.ndarray, ref: float) -> np.ndarray:
    """Angular distance in degrees, [0, 180]."""
    d = np.abs(hue - ref) % 360.0
    return np.minimum(d, 360.0 - d)


def _hue_of(rgb: tuple[int, int, int]) -> float:
    return float(_hsv(np.asarray(rgb, dtype=np.float64))[0])


_COLOR_HUES = {name: _hue_of(rgb) for name, rgb in COLORS.items()}
_PALETTE_CHROMA = {name: float(max(rgb) - min(rgb)) for name, rgb in COLORS.items()}  # max − min
_COLOR_CHROMAS = {  # norm of each palette color's deviation from gray, mean removed
    name: float(np.linalg.norm(np.subtract(rgb, np.mean(rgb)))) for name, rgb in COLORS.items()
}
_SUN_HUE = _hue_of(SUN_COLOR)
_GRAY = float(np.mean(BACKGROUND))
# The stripe phase (row mod 6) of every pixel, (32, 32).
_ROW_PHASE = np.repeat(np.arange(IMAGE_SIZE) % STRIPE_PERIOD, IMAGE_SIZE).reshape(IMAGE_SIZE, IMAGE_SIZE)
_ROW_PHASE.flags.writeable = False


def _empty_mask() -> np.ndarray:
    """A fresh all-False (32, 32) mask (regions never share memory)."""
    return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)


def _border(a: np.ndarray) -> np.ndarray:
    """The outermost pixels of an (H, W, ...) array, (2H + 2W − 4, ...)."""
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _background_corrections(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image with the border's median color moved onto the world's gray, two ways.

    Returns float (H, W, 3) images corrected by a per-channel offset (undoes a global color
    shift exactly) and by a per-channel gain (undoes a global color scaling exactly, and keeps
    black black); both clipped to BACKGROUND_SHIFT_LIMIT.
    """
    seen = np.median(_border(image), axis=0)
    gray = np.asarray(BACKGROUND, dtype=np.float64)
    shift = np.clip(seen - gray, -BACKGROUND_SHIFT_LIMIT, BACKGROUND_SHIFT_LIMIT)
    gain = gray / np.clip(seen, gray - BACKGROUND_SHIFT_LIMIT, gray + BACKGROUND_SHIFT_LIMIT)
    return image - shift, image * gain


_EDGES = ndimage.generate_binary_structure(2, 1)  # 4-neighbourhood: pixels touch through edges
_SQUARE = np.ones((3, 3), dtype=bool)  # 8-neighbourhood: also through corners
_STRIPE_BRIDGE = np.ones((STRIPE_PERIOD // 2 + 2, 1), dtype=bool)  # a column of 5 pixels


def _label(mask: np.ndarray, diagonal: bool = False) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D boolean mask: (H, W) labels 1…n (0 outside), in raster order
    of their first pixel, and n. Pixels touch through edges, and also through corners if ``diagonal``."""
    labels, count = ndimage.label(mask, structure=_SQUARE if diagonal else _EDGES)
    return labels, int(count)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest edge-connected component of the mask (the mask itself if empty; ties: the first)."""
    labels, count = _label(mask)
    if count == 0:
        return mask
    return labels == (1 + int(np.argmax(np.bincount(labels.ravel())[1:])))


def _grow(core: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The core plus the pixels of ``allowed`` 8-connected to it."""
    labels, _ = _label(core | allowed, diagonal=True)
    keep = np.unique(labels[core])
    return np.isin(labels, keep[keep > 0])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus the outside pixels not edge-connected to the image border."""
    return ndimage.binary_fill_holes(mask, structure=_EDGES)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3 × 3 binary erosion (beyond the border counts as outside)."""
    return ndimage.binary_erosion(mask, structure=_SQUARE, border_value=0)


def _dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """3 × 3 binary dilation, repeated ``iterations`` (≥ 1) times."""
    return ndimage.binary_dilation(mask, structure=_SQUARE, iterations=iterations)


def _open2(mask: np.ndarray) -> np.ndarray:
    """2 × 2 binary opening: the union of the 2 × 2 blocks that lie wholly inside the mask."""
    return ndimage.binary_opening(mask, structure=np.ones((2, 2), dtype=bool))


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


# ------------------------------------------------------------------ detection


def _features(image: np.ndarray) -> dict:
    """The decisions for one (32, 32, 3) image and the quantities they are made from."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected a ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) image, got {image.shape}")
    img, scaled = _background_corrections(image.astype(np.float64))
    hue, chroma, value = _hsv(img)

    # A color shift and a color scaling tint black differently: black under either correction.
    _, scaled_chroma, scaled_value = _hsv(scaled)
    hat_core = (value < HAT_MAX_VALUE) & (chroma < HAT_MAX_CHROMA)
    hat_core |= (scaled_value < HAT_MAX_VALUE) & (scaled_chroma < HAT_MAX_CHROMA)

    sun_hued = _hue_distance(hue, _SUN_HUE) <= SUN_HUE_TOLERANCE
    sun_core = sun_hued & (chroma > SUN_MIN_CHROMA) & (value > SUN_MIN_VALUE)
    # Only solid parts count (2 × 2 blocks): the disc has them, the thin yellow fringe an over-sharpening
    # model draws around a blue object (its complement) has not (the audit, docs/detectors.md).
    sun_core = _open2(sun_core)
    sun = int(sun_core.sum()) >= SUN_MIN_PIXELS
    suns = _count_blobs(sun_core, sun_core, SUN_MIN_PIXELS)
    sun_region = _empty_mask()
    if sun:
        half = SUN_REGION_FRACTION * float(np.median(chroma[sun_core]))
        sun_region = _grow(sun_core, sun_hued & (chroma >= half))

    edge_spread = _edge_spread(img)
    blurry = bool(edge_spread >= BLURRY_MIN_EDGE_SPREAD)

    vivid = (chroma > COLOR_MIN_CHROMA) & (value > COLOR_MIN_VALUE) & ~sun_hued
    color = None
    if int(vivid.sum()) >= COLOR_MIN_PIXELS:
        names = list(_COLOR_HUES)
        dist = np.stack([_hue_distance(hue[vivid], _COLOR_HUES[n]) for n in names])
        color = names[int(np.bincount(dist.argmin(axis=0), minlength=len(names)).argmax())]

    obj, own_hue, reference = _empty_mask(), None, 0.0
    if color is not None:
        own_hue = _hue_distance(hue, _COLOR_HUES[color]) <= OBJECT_HUE_TOLERANCE
        reference = float(np.percentile(chroma[vivid], 90))
        obj = _object_mask(chroma, own_hue & ~sun_region, reference)
        if int(obj.sum()) < OBJECT_MIN_PIXELS:  # a few stray vivid pixels, no object: no color either
            obj, color = _empty_mask(), None

    # The region grows from the core through dark pixels, never into the object (a model's dark shades
    # of a green or blue object would let it flood the object: the audit, docs/detectors.md).
    allowed = (value < HAT_REGION_MAX_VALUE) & ~obj
    hat_region = _grow(hat_core & ~obj, allowed) if hat_core.sum() >= HAT_MIN_PIXELS else _empty_mask()
    hat_rise = _rise_above(hat_region, obj) if color is not None else IMAGE_SIZE
    # A hat's crown rises above the object; the dark outline an over-sharpening model draws around
    # the object hugs it and rises at most a few rows (see HAT_MIN_RISE).
    # A blurred image has no crisp outline to mistake for a hat, and models draw smaller hats there.
    min_rise = HAT_MIN_RISE_BLURRY if blurry else HAT_MIN_RISE
    hat = bool(hat_region.any()) and hat_rise >= min_rise
    if not hat:
        hat_region = _empty_mask()
    hats = (
        _count_hats(hat_region, hat_core, obj, min_rise)
        if color is not None
        else _count_blobs(hat_region, hat_core, HAT_MIN_PIXELS)
    )

    shape, shape_scores, stripe_contrast = None, {}, 0.0
    if color is not None:
        coverage = _object_coverage(chroma, own_hue, obj)
        care = ~_dilate(hat_region) & ~sun_region
        shape_scores = _shape_scores(coverage, obj, care, blurry)
        shape = min(shape_scores, key=shape_scores.get)
        object_color = np.median(img[vivid & (chroma >= reference)], axis=0)
        # Stripes are measured inside the object: its outermost pixels carry the outlines and halos of
        # over-sharpened model images, which vary row by row (docs/detectors.md, the audit).
        # A small object's interior may leave too few stripe phases to fit (a small sharpened striped
        # triangle of the second audit, docs/audit/audit.md): then the whole object is measured.
        stripe_contrast = _stripe_contrast(img, object_color, _COLOR_CHROMAS[color], _erode(obj), hat_region)
        if np.isnan(stripe_contrast):
            stripe_contrast = _stripe_contrast(img, object_color, _COLOR_CHROMAS[color], obj, hat_region)
        if np.isnan(stripe_contrast):
            stripe_contrast = 0.0

    object_contrast = _object_contrast(hue, chroma, sun_hued)
    washed_out = bool(object_contrast < MIN_OBJECT_CONTRAST)  # NaN (no object) compares False
    striped = stripe_contrast >= (STRIPE_MIN_CONTRAST if blurry else STRIPE_MIN_CONTRAST_SHARP)
    if washed_out:
        shape = color = hat = striped = hats = UNREADABLE
    return dict(
        shape=shape,
        color=color,
        hat=hat,
        sun=sun,
        striped=striped,
        blurry=blurry,
        object_contrast=object_contrast,
        regions=dict(object=obj, hat=hat_region, sun=sun_region),
        suns=suns,
        hats=hats,
        hat_pixels=int(hat_core.sum()),
        hat_rise=hat_rise,
        sun_pixels=int(sun_core.sum()),
        color_pixels=int(vivid.sum()),
        shape_scores=shape_scores,
        stripe_contrast=stripe_contrast,
        edge_spread=edge_spread,
    )


def detect(image: np.ndarray) -> Detection:
    """Reads shape, color, hat, sun, stripes and blur from one (32, 32, 3) uint8 image.

    Any numeric dtype holding 0–255 values works; a model's [−1, 1] or [0, 1] output must be
    rescaled first.
    """
    f = _features(image)
    return Detection(
        shape=f["shape"],
        color=f["color"],
        hat=f["hat"],
        sun=f["sun"],
        striped=f["striped"],
        blurry=f["blurry"],
        regions=f["regions"],
        suns=f["suns"],
        hats=f["hats"],
    )


def detect_batch(images: np.ndarray) -> list[Detection]:
    """:func:`detect` for each image of an (N, 32, 32, 3) uint8 batch."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected an (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) batch, got {images.shape}")
    return [detect(image) for image in images]
