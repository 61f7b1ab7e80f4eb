"""The detectors' thresholds, each with the measured ranges it separates (docs/detectors.md).

Kept in one place: every number a detection is compared with, and why it lies where it does.
"""

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
