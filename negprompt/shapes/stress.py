"""A stress suite for the detectors: rendered scenes under perturbations that imitate what a model
draws, with the truth known by construction.

Each family is a few variants (a perturbation at one strength). A variant draws a scene (with some
attributes fixed where the perturbation needs them, e.g. a hat for "partial hat"), renders it,
perturbs the pixels and says what the truth is. :func:`run_stress` detects every image and counts,
per family, variant and attribute, how many were read right, wrong, or declared unreadable.

Families (what model images show under some negatives, see docs/detectors.md):

- sharpening: unsharp masking at several strengths; light halos around the object;
- dark outlines around the object (no hat);
- partial hats (half a hat) and faint hats (70 % opacity); ghost hats (25 %: no hat);
- doubled suns (two discs) and suns clipped by the frame;
- colour shifts (per-channel offsets and gains) and Gaussian pixel noise;
- blur around the blur threshold (σ 0.5 sharp, σ 1.0 and 1.6 blurry);
- low contrast (the image moved 30 % or 45 % towards the background gray).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from negprompt.shapes.detectors import ATTRIBUTES, UNREADABLE, detect
from negprompt.shapes.scene import BACKGROUND, IMAGE_SIZE, Scene, _gaussian_blur, render, sample_scene

Image = np.ndarray  # (32, 32, 3) float64, 0–255


@dataclass(frozen=True)
class Variant:
    """One perturbation at one strength: ``fixed`` scene attributes, and ``make(scene, rng)`` → image."""

    family: str
    name: str
    make: Callable[[Scene, np.random.Generator], Image]
    fixed: dict


def _render(scene: Scene) -> Image:
    return render(scene).image.astype(np.float64)


def _object_ring(scene: Scene, inner: int, outer: int) -> np.ndarray:
    """Pixels between ``inner`` and ``outer`` pixels outside the object's edge, (32, 32) bool."""
    from scipy import ndimage

    inside = render(replace(scene, blurry=False)).regions["object"] >= 0.5
    square = np.ones((3, 3), dtype=bool)
    grown = ndimage.binary_dilation(inside, square, iterations=outer)
    kept = ndimage.binary_dilation(inside, square, iterations=inner) if inner else inside
    return grown & ~kept


def _blend(image: Image, mask: np.ndarray, color: tuple[float, float, float], amount: float) -> Image:
    out = image.copy()
    out[mask] = (1 - amount) * out[mask] + amount * np.asarray(color, dtype=np.float64)
    return out


def unsharp(amount: float) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        image = _render(scene)
        return image + amount * (image - _gaussian_blur(image, 1.0))

    return make


def halo(amount: float) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        return _blend(_render(scene), _object_ring(scene, 0, 2), (255, 255, 255), amount)

    return make


def dark_outline(amount: float, width: int) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        return _blend(_render(scene), _object_ring(scene, 0, width), (20, 20, 20), amount)

    return make


def hat_with(opacity: float, keep: str = "all") -> Callable[[Scene, np.random.Generator], Image]:
    """The scene's hat at ``opacity`` over what lies beneath, all of it or its ``left`` half."""

    def make(scene: Scene, rng: np.random.Generator) -> Image:
        with_hat, without = _render(scene), _render(replace(scene, hat=False))
        weight = np.full((IMAGE_SIZE, IMAGE_SIZE, 1), opacity)
        if keep == "left":
            columns = (np.arange(IMAGE_SIZE) + 0.5) < scene.center[0]
            weight[:, ~columns] = 0.0
        return weight * with_hat + (1 - weight) * without

    return make


def double_sun(scene: Scene, rng: np.random.Generator) -> Image:
    left, right = _render(replace(scene, sun_side="left")), _render(replace(scene, sun_side="right"))
    without = _render(replace(scene, sun=False))
    return left + right - without  # each sun where it is, the rest once


def clipped_sun(shift: int) -> Callable[[Scene, np.random.Generator], Image]:
    """The sun moved ``shift`` pixels up and out towards its corner: part of it leaves the frame."""

    def make(scene: Scene, rng: np.random.Generator) -> Image:
        with_sun, without = _render(scene), _render(replace(scene, sun=False))
        delta = with_sun - without
        moved = np.zeros_like(delta)
        dx = -shift if scene.sun_side == "left" else shift
        src_x = slice(max(0, -dx), IMAGE_SIZE - max(0, dx))
        dst_x = slice(max(0, dx), IMAGE_SIZE - max(0, -dx))
        moved[: IMAGE_SIZE - shift, dst_x] = delta[shift:, src_x]
        return without + moved

    return make


def color_shift(offset: float, gain: float) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        signs = rng.choice([-1.0, 1.0], size=3)
        gains = 1.0 + signs * (gain - 1.0) * rng.permutation([1.0, 0.5, 0.0])
        return _render(scene) * gains + offset * rng.choice([-1.0, 1.0], size=3)

    return make


def noise(sigma: float) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        image = _render(scene)
        return image + rng.normal(0.0, sigma, image.shape)

    return make


def blur(sigma: float) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        return _gaussian_blur(_render(replace(scene, blurry=False)), sigma)

    return make


def low_contrast(amount: float) -> Callable[[Scene, np.random.Generator], Image]:
    def make(scene: Scene, rng: np.random.Generator) -> Image:
        return (1 - amount) * _render(scene) + amount * np.asarray(BACKGROUND, dtype=np.float64)

    return make


SHARP = {"blurry": False}  # perturbations whose truth needs a sharp scene
VARIANTS: tuple[Variant, ...] = (
    Variant("clean", "as rendered", lambda scene, rng: _render(scene), {}),
    Variant("sharpening", "unsharp 1", unsharp(1.0), SHARP),
    Variant("sharpening", "unsharp 2", unsharp(2.0), SHARP),
    Variant("sharpening", "light halo 50 %", halo(0.5), SHARP),
    Variant("dark outline", "1 px, 60 %", dark_outline(0.6, 1), {**SHARP, "hat": False}),
    Variant("dark outline", "1 px, 90 %", dark_outline(0.9, 1), {**SHARP, "hat": False}),
    Variant("dark outline", "2 px, 70 %", dark_outline(0.7, 2), {**SHARP, "hat": False}),
    Variant("partial or faint hat", "left half", hat_with(1.0, "left"), {"hat": True}),
    Variant("partial or faint hat", "70 % opacity", hat_with(0.7), {"hat": True}),
    Variant("ghost hat", "25 % opacity (no hat)", hat_with(0.25), {"hat": True}),
    Variant("doubled or clipped sun", "two suns", double_sun, {**SHARP, "sun": True}),
    Variant("doubled or clipped sun", "clipped by 2 px", clipped_sun(2), {"sun": True}),
    Variant("doubled or clipped sun", "clipped by 3 px", clipped_sun(3), {"sun": True}),
    Variant("colour shift", "±25 offset", color_shift(25.0, 1.0), {}),
    Variant("colour shift", "×(1 ± 0.15) gain", color_shift(0.0, 1.15), {}),
    Variant("noise", "σ 8", noise(8.0), {}),
    Variant("noise", "σ 12", noise(12.0), {}),
    Variant("blur near the threshold", "σ 0.5 (sharp)", blur(0.5), SHARP),
    Variant("blur near the threshold", "σ 1.0 (blurry)", blur(1.0), SHARP),
    Variant("blur near the threshold", "σ 1.6 (blurry)", blur(1.6), SHARP),
    Variant("low contrast", "30 % towards gray", low_contrast(0.3), {}),
    Variant("low contrast", "45 % towards gray", low_contrast(0.45), {}),
)


def truth_of(variant: Variant, scene: Scene) -> dict[str, object]:
    """What the perturbed image shows: the scene's attributes, changed where the variant changes them."""
    truth = {name: getattr(scene, name) for name in ATTRIBUTES if name != "impossible"}
    truth["impossible"] = variant.name == "two suns"  # the only scene here the world never draws
    if variant.family == "ghost hat":
        truth["hat"] = False  # a quarter-opacity shadow of a hat is not a hat
    if variant.family == "blur near the threshold":
        truth["blurry"] = "sharp" not in variant.name
    return truth


def run_stress(images_per_variant: int, seed: int = 0, variants: tuple[Variant, ...] = VARIANTS) -> list[dict]:
    """Rows per variant and attribute: counts of right, wrong and unreadable readings."""
    rows = []
    for index, variant in enumerate(variants):
        rng = np.random.default_rng([seed, index])
        counts = {name: {"right": 0, "wrong": 0, "unreadable": 0} for name in ATTRIBUTES}
        for _ in range(images_per_variant):
            scene = sample_scene(rng, **variant.fixed)
            image = np.clip(np.round(variant.make(scene, rng)), 0, 255).astype(np.uint8)
            detection, truth = detect(image), truth_of(variant, scene)
            for name in ATTRIBUTES:
                read = getattr(detection, name)
                outcome = "unreadable" if read is UNREADABLE else "right" if read == truth[name] else "wrong"
                counts[name][outcome] += 1
        for name in ATTRIBUTES:
            rows.append({"family": variant.family, "variant": variant.name, "attribute": name, **counts[name]})
    return rows
