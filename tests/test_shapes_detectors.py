"""The shapes-world detectors read every attribute back from rendered scenes.

Accuracy is measured on 400 scenes drawn with a fixed seed that cycle through every
combination of shape, color, hat, sun, stripes and blur, clean and perturbed the way a model's
samples are (pixel noise; a global color shift). Run with ``-s`` to see the accuracies.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from negprompt.shapes.detector_measures import _shape_templates
from negprompt.shapes.detectors import Detection, detect, detect_batch
from negprompt.shapes.scene import COLORS, IMAGE_SIZE, SHAPES, render, sample_scene

ATTRIBUTES = ("shape", "color", "hat", "sun", "striped", "blurry")
COMBINATIONS = list(itertools.product(SHAPES, COLORS, *[(False, True)] * 4))  # 192
N_IMAGES = 400
N_SHIFTED = 200  # noise plus a color shift on the first 200 scenes (still every combination)
MIN_ACCURACY = 0.98
NOISE_SIGMA = 6.0
COLOR_SHIFT = 15.0


def _noisy(image: np.ndarray, rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Gaussian pixel noise (σ = NOISE_SIGMA) plus a global per-channel shift in ±``shift``."""
    x = image.astype(np.float64) + rng.normal(0.0, NOISE_SIGMA, image.shape)
    x += rng.uniform(-shift, shift, size=3)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world():
    """Scenes, their renderings and detections: clean, noisy, and noisy with a color shift."""
    rng = np.random.default_rng(2024)
    scenes = [sample_scene(rng, **dict(zip(ATTRIBUTES, COMBINATIONS[i % len(COMBINATIONS)]))) for i in range(N_IMAGES)]
    renderings = [render(scene) for scene in scenes]
    clean = np.stack([r.image for r in renderings])
    noise_rng = np.random.default_rng(7)
    noisy = np.stack([_noisy(image, noise_rng) for image in clean])
    shifted = np.stack([_noisy(image, noise_rng, COLOR_SHIFT) for image in clean[:N_SHIFTED]])
    return dict(
        scenes=scenes,
        renderings=renderings,
        clean=detect_batch(clean),
        noisy=detect_batch(noisy),
        noisy_shifted=detect_batch(shifted),
    )


def _accuracies(scenes, detections) -> dict[str, float]:
    return {a: float(np.mean([getattr(d, a) == getattr(s, a) for s, d in zip(scenes, detections)])) for a in ATTRIBUTES}


def test_scenes_cover_every_combination(world):
    seen = {tuple(getattr(s, a) for a in ATTRIBUTES) for s in world["scenes"]}
    assert seen == set(COMBINATIONS)
    seen_shifted = {tuple(getattr(s, a) for a in ATTRIBUTES) for s in world["scenes"][:N_SHIFTED]}
    assert seen_shifted == set(COMBINATIONS)


@pytest.mark.parametrize("condition", ["clean", "noisy", "noisy_shifted"])
def test_accuracy_per_attribute(world, condition):
    detections = world[condition]
    accuracy = _accuracies(world["scenes"][: len(detections)], detections)
    print(f"\n{condition} ({len(detections)} images):", {a: round(v, 4) for a, v in accuracy.items()})
    assert all(v >= MIN_ACCURACY for v in accuracy.values()), accuracy


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.mark.parametrize("condition", ["clean", "noisy"])
@pytest.mark.parametrize("noun", ["hat", "sun"])
def test_noun_regions_match_rendered_regions(world, condition, noun):
    ious = []
    for scene, rendering, detection in zip(world["scenes"], world["renderings"], world[condition]):
        region = detection.regions[noun]
        assert region.shape == (IMAGE_SIZE, IMAGE_SIZE) and region.dtype == bool
        if getattr(scene, noun):
            ious.append(_iou(region, rendering.regions[noun] >= 0.5))
        elif not getattr(detection, noun):
            assert not region.any()
    print(f"\n{noun} IoU ({condition}): min {min(ious):.3f}, mean {np.mean(ious):.3f}")
    assert min(ious) > 0.5


def test_object_region_is_the_visible_object(world):
    for scene, rendering, detection in zip(world["scenes"], world["renderings"], world["clean"]):
        visible = rendering.regions["object"] >= 0.5
        if scene.hat:
            visible &= rendering.regions["hat"] < 0.5
        assert _iou(detection.regions["object"], visible) > 0.6


def test_detection_api():
    rng = np.random.default_rng(0)
    images = np.stack([render(sample_scene(rng)).image for _ in range(3)])
    batch = detect_batch(images)
    assert len(batch) == 3 and all(isinstance(d, Detection) for d in batch)
    assert [d.to_json() for d in batch] == [detect(image).to_json() for image in images]
    out = json.loads(json.dumps(batch[0].to_json()))
    assert set(out) == set(ATTRIBUTES) | {"impossible"}  # the scene attributes, and two suns or hats
    assert set(batch[0].regions) == {"object", "hat", "sun"}
    with pytest.raises(ValueError):
        detect(images[0][:16])
    with pytest.raises(ValueError):
        detect_batch(images[0])


def test_blank_background_holds_nothing():
    detection = detect(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 200, dtype=np.uint8))
    assert detection.to_json() == dict(
        shape=None, color=None, hat=False, sun=False, striped=False, blurry=False, impossible=False
    )
    assert not any(mask.any() for mask in detection.regions.values())


def test_dark_colored_pixels_are_not_a_hat():
    """Darkness alone is no hat: dark navy stripes (max channel 60, but colored) are not one."""
    scene = sample_scene(
        np.random.default_rng(1), shape="square", color="blue", hat=False, sun=False, striped=True, blurry=False
    )
    rendering = render(scene)
    image = rendering.image.copy()
    image[rendering.regions["striped"] >= 0.5] = (5, 10, 60)
    detection = detect(image)
    assert not detection.hat and not detection.regions["hat"].any()


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_templates_draw_like_the_renderer(shape):
    rng = np.random.default_rng(3)
    for _ in range(5):
        scene = sample_scene(rng, shape=shape, blurry=False)
        window = slice(0, IMAGE_SIZE)
        template = _shape_templates(
            shape,
            scene.center[0],
            np.array([scene.center[1]]),
            np.array([scene.size]),
            window,
            window,
            blurry=False,
        )[0]
        np.testing.assert_allclose(template, render(scene).regions["object"])
