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

This module makes the decisions; the thresholds (with the ranges each separates) are in
:mod:`~negprompt.shapes.detector_thresholds`, the colour and mask operations in
:mod:`~negprompt.shapes.detector_pixels`, and what is measured on the object (its mask, shape fit,
stripe index, edge spread, hat and sun parts) in :mod:`~negprompt.shapes.detector_measures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from negprompt.shapes.detector_measures import (
    _count_blobs,
    _count_hats,
    _edge_spread,
    _object_contrast,
    _object_coverage,
    _object_mask,
    _rise_above,
    _shape_scores,
    _stripe_contrast,
)
from negprompt.shapes.detector_pixels import (
    _COLOR_CHROMAS,
    _COLOR_HUES,
    _SUN_HUE,
    _background_corrections,
    _dilate,
    _empty_mask,
    _erode,
    _grow,
    _hsv,
    _hue_distance,
    _open2,
)
from negprompt.shapes.detector_thresholds import (
    BLURRY_MIN_EDGE_SPREAD,
    COLOR_MIN_CHROMA,
    COLOR_MIN_PIXELS,
    COLOR_MIN_VALUE,
    HAT_MAX_CHROMA,
    HAT_MAX_VALUE,
    HAT_MIN_PIXELS,
    HAT_MIN_RISE,
    HAT_MIN_RISE_BLURRY,
    HAT_REGION_MAX_VALUE,
    MIN_OBJECT_CONTRAST,
    OBJECT_HUE_TOLERANCE,
    OBJECT_MIN_PIXELS,
    STRIPE_MIN_CONTRAST,
    STRIPE_MIN_CONTRAST_SHARP,
    SUN_HUE_TOLERANCE,
    SUN_MIN_CHROMA,
    SUN_MIN_PIXELS,
    SUN_MIN_VALUE,
    SUN_REGION_FRACTION,
)
from negprompt.shapes.scene import (
    IMAGE_SIZE,
)

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
