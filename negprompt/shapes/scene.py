"""The shapes world: procedural 32×32 scenes with known attributes, and their captions.

A scene holds one object (a shape with a color) on a plain gray background, and four
removable things that appear at random when a caption does not name them:

- nouns: ``hat`` (a black top hat on the object) and ``sun`` (a yellow disc in a top corner);
- adjectives: ``striped`` (light horizontal stripes on the object) and ``blurry`` (the whole
  image blurred, an image-quality defect of the kind users put in negative prompts).

Captions name a random subset of what is present, never something absent, either as a sentence
("a blurry red circle with a hat") or as a fragment naming one or two things ("a hat",
"striped", "blurry", "a sun", "a red shape").

Versions of the world (``WORLDS``): ``v1``, on which the bundled model was first trained, puts
the sun in either top corner and names each present thing with probability ½, hat before sun;
``v2``, of the fine-tune that keeps things apart (docs/training.md), always puts the sun top right
(with a random side the model hedged under guidance and drew both suns), names present things
with probability 0.8 (so a caption's silence about a thing more often means it is absent) and
the nouns in either order; ``v3``, its last stage, names them with probability 0.65 (at 0.8 the
model drew an unnamed hat in only 12 % of plain images: too little variety for a negative to act on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4× and area-averaged: anti-aliased edges

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (150, 55, 200),
}
BACKGROUND = (200, 200, 200)
HAT_COLOR = (25, 25, 25)
SUN_COLOR = (250, 215, 40)
STRIPE_LIGHTEN = 0.5  # stripe pixels move this far from the object color towards white
STRIPE_PERIOD = 6  # pixels; 3 light rows, 3 object-colored rows
BLUR_SIGMA = 1.2  # pixels

NOUNS = ("hat", "sun")
ADJECTIVES = ("striped", "blurry")
# Probability that each removable thing is present in a scene.
PRESENCE = {"hat": 0.45, "sun": 0.45, "striped": 0.4, "blurry": 0.35}


@dataclass(frozen=True)
class World:
    """What varies between versions of the world: the sun's corners and how captions name things."""

    sun_sides: tuple[str, ...] = ("left", "right")
    name_extra: float = 0.5  # probability that a sentence names each present hat / sun / stripes / blur
    shuffle_nouns: bool = False  # "with a sun and a hat" as well as "with a hat and a sun"


WORLDS = {
    "v1": World(),
    "v2": World(sun_sides=("right",), name_extra=0.8, shuffle_nouns=True),
    "v3": World(sun_sides=("right",), name_extra=0.65, shuffle_nouns=True),
}


# Words of every caption the world writes; the bundled tokenizer's vocabulary.
VOCABULARY = ("a", "with", "and", "shape", *COLORS, *SHAPES, *NOUNS, *ADJECTIVES)


@dataclass(frozen=True)
class Scene:
    """The true attributes of one image; what captions and detectors are about."""

    shape: str
    color: str
    center: tuple[float, float]  # (x, y) in pixels
    size: float  # circle radius, square half side, triangle half width, in pixels
    hat: bool
    sun: bool
    sun_side: str  # "left" or "right"
    striped: bool
    blurry: bool

    def to_json(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator, world: World = WORLDS["v1"], **fixed) -> Scene:
    """Draws a random scene; keyword arguments fix attributes (e.g. ``hat=False``)."""
    sides = world.sun_sides
    values = dict(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        center=(float(rng.uniform(14.0, 18.0)), float(rng.uniform(17.0, 21.0))),
        size=float(rng.uniform(6.0, 8.0)),
        hat=bool(rng.random() < PRESENCE["hat"]),
        sun=bool(rng.random() < PRESENCE["sun"]),
        # v1 drew this number for the side; kept so that v1's stream stays what it was
        sun_side=sides[int(rng.random() * len(sides))],
        striped=bool(rng.random() < PRESENCE["striped"]),
        blurry=bool(rng.random() < PRESENCE["blurry"]),
    )
    unknown = set(fixed) - set(values)
    if unknown:
        raise ValueError(f"unknown scene attribute(s) {sorted(unknown)}; known: {sorted(values)}")
    values.update(fixed)
    return Scene(**values)


# ---------------------------------------------------------------- rendering


def _grid(size: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a supersampled grid, in output-pixel units: (H·f, W·f) each."""
    coords = (np.arange(size * factor) + 0.5) / factor
    return np.meshgrid(coords, coords)  # x, y


def _downsample(mask: np.ndarray, factor: int) -> np.ndarray:
    """Area average of a (H·f, W·f) array to (H, W)."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    return mask.reshape(h, factor, w, factor).mean(axis=(1, 3))


def object_top(scene: Scene) -> float:
    """The y coordinate of the object's highest point, where the hat sits."""
    return scene.center[1] - scene.size


def _object_coverage(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy = scene.center
    s = scene.size
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= s**2
    elif scene.shape == "square":
        inside = (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    elif scene.shape == "triangle":
        # Upward isosceles triangle: apex (cx, cy - s), base from (cx ± s, cy + s).
        t = (y - (cy - s)) / (2 * s)  # 0 at apex, 1 at base
        inside = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= s * t)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES)}")
    return inside


def _hat_coverage(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx = scene.center[0]
    top = object_top(scene) + 0.5  # the brim overlaps the object's top a little
    brim = (np.abs(x - cx) <= 4.5) & (y >= top - 1.5) & (y <= top + 0.5)
    crown = (np.abs(x - cx) <= 2.5) & (y >= top - 6.0) & (y < top - 1.5)
    return brim | crown


def _sun_coverage(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sx = 5.0 if scene.sun_side == "left" else IMAGE_SIZE - 5.0
    return (x - sx) ** 2 + (y - 5.0) ** 2 <= 3.3**2


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image with edge replication."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    rows = sum(t * padded[i : i + h, :, :] for i, t in enumerate(taps))
    return sum(t * rows[:, i : i + w, :] for i, t in enumerate(taps))


@dataclass(frozen=True)
class Rendering:
    """An image and the region of each thing in it (coverage fractions in [0, 1], (H, W))."""

    image: np.ndarray  # (H, W, 3) uint8
    regions: dict[str, np.ndarray]


def render(scene: Scene, size: int = IMAGE_SIZE) -> Rendering:
    """Draws a scene: object, stripes, hat, sun, then the blur of the whole image."""
    if size != IMAGE_SIZE:
        raise ValueError(f"the shapes world is drawn at {IMAGE_SIZE}×{IMAGE_SIZE} only, not {size}")
    x, y = _grid(size, SUPERSAMPLE)
    canvas = np.empty((size * SUPERSAMPLE, size * SUPERSAMPLE, 3), dtype=np.float64)
    canvas[:] = BACKGROUND

    obj = _object_coverage(scene, x, y)
    color = np.asarray(COLORS[scene.color], dtype=np.float64)
    canvas[obj] = color
    regions = {"object": obj}
    if scene.striped:
        light = (np.floor(y) % STRIPE_PERIOD) < STRIPE_PERIOD / 2
        stripes = obj & light
        canvas[stripes] = color + STRIPE_LIGHTEN * (255.0 - color)
        regions["striped"] = stripes
    if scene.hat:
        hat = _hat_coverage(scene, x, y)
        canvas[hat] = HAT_COLOR
        regions["hat"] = hat
    if scene.sun:
        sun = _sun_coverage(scene, x, y)
        canvas[sun] = SUN_COLOR
        regions["sun"] = sun

    image = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if scene.blurry:
        image = _gaussian_blur(image, BLUR_SIGMA)
    out = {name: _downsample(m.astype(np.float64), SUPERSAMPLE) for name, m in regions.items()}
    return Rendering(image=np.clip(np.rint(image), 0, 255).astype(np.uint8), regions=out)


# ---------------------------------------------------------------- captions

SENTENCE_PROBABILITY = 0.7  # otherwise a fragment
NAME_COLOR = 0.8
NAME_SHAPE = 0.8


def sentence(scene: Scene, named: set[str], nouns_reversed: bool = False) -> str:
    """The caption sentence naming exactly ``named`` (a subset of the scene's attributes)."""
    words = ["a"]
    words += [adj for adj in ("blurry", "striped") if adj in named]
    if "color" in named:
        words.append(scene.color)
    words.append(scene.shape if "shape" in named else "shape")
    nouns = [n for n in ("hat", "sun") if n in named]
    if nouns_reversed:
        nouns.reverse()
    if nouns:
        words += ["with", "a", nouns[0]]
        for noun in nouns[1:]:
            words += ["and", "a", noun]
    return " ".join(words)


def _fragment_of(scene: Scene, item: str) -> str:
    if item in NOUNS:
        return f"a {item}"
    if item in ADJECTIVES:
        return item
    if item == "color":
        return f"a {scene.color} shape"
    return f"a {scene.shape}"


def present_things(scene: Scene) -> list[str]:
    """The removable things present in a scene, in caption order."""
    return [t for t in (*ADJECTIVES, *NOUNS) if getattr(scene, t)]


def sample_caption(scene: Scene, rng: np.random.Generator, world: World = WORLDS["v1"]) -> str:
    """A caption naming a random subset of what the scene holds (never anything absent)."""
    present = present_things(scene)
    if rng.random() < SENTENCE_PROBABILITY:
        named = {t for t in present if rng.random() < world.name_extra}
        if rng.random() < NAME_COLOR:
            named.add("color")
        if rng.random() < NAME_SHAPE:
            named.add("shape")
        reverse = world.shuffle_nouns and bool(rng.random() < 0.5)
        return sentence(scene, named, nouns_reversed=reverse)
    items = ["color", "shape", *present]
    # Removable things are what negatives name: give their fragments more weight.
    weights = np.array([1.0, 1.0] + [2.0] * len(present))
    count = 1 if len(items) == 1 or rng.random() < 0.6 else 2
    chosen = rng.choice(len(items), size=count, replace=False, p=weights / weights.sum())
    return " and ".join(_fragment_of(scene, items[i]) for i in sorted(chosen))


def sample_example(seed: int, index: int, world: World = WORLDS["v1"]) -> tuple[Scene, Rendering, str]:
    """The ``index``-th training example of the stream drawn from ``seed`` (resumable)."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, world)
    return scene, render(scene), sample_caption(scene, rng, world)
