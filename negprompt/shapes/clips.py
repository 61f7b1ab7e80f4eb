"""Short clips of the shapes world: a shape that moves along a path, a hat or a sun that can appear.

A clip is the image world (:mod:`negprompt.shapes.scene`) in time. One object with a fixed shape,
color, size, stripes and blur moves in a straight line at constant speed across the middle of the
frame; a hat (on the object) and a sun (top right) are each absent, present from the first frame, or
appear at a frame ``k`` ≥ 1 and stay. Every frame is a :class:`~negprompt.shapes.scene.Scene`, drawn by
:func:`~negprompt.shapes.scene.render` at the bundled model's 32×32, so the image detectors read it.

Frame counts are 4k + 1 (5, 9, 17, …), the counts of the Wan family, whose video VAE keeps the first
frame and compresses each following 4 into one latent frame: 9 frames are 3 latent frames there, 17
are 5. The bundled model works on pixels (no VAE), so a clip's frames are the model's frames.

Captions come from the image grammar (:func:`~negprompt.shapes.scene.sample_caption`) applied to what
the clip holds at any frame, so a caption never names something that never appears.

The path keeps the object's x within [9, 21] and the sun always top right (world v3's rule): the hat's
crown (x ± 2.5 around the object's centre) then never reaches the sun's disc (x ≥ 23.7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from negprompt.shapes.scene import NOUNS, PRESENCE, WORLDS, Scene, World, render, sample_caption, sample_scene

DEFAULT_FRAMES = 9
TEMPORAL_FACTOR = 4  # a Wan video VAE: frames 4k + 1 → latent frames k + 1
PATH_X = ((9.0, 12.0), (18.0, 21.0))  # the object's centre x at one end of the path and at the other
PATH_Y = (17.0, 21.0)  # its centre y at each end (the image world's range)
APPEAR_MIDWAY = 0.5  # probability that a present hat or sun appears at a frame k ≥ 1 instead of frame 0
MOTION_BLUR_SAMPLES = 4  # sub-frame positions averaged for motion blur
SHUTTER = 0.5  # the exposure, as a share of the time between frames (a 180° shutter)
THING_REGIONS = ("hat", "sun", "striped")  # as the image trainer weighs them
CLIP_WORLD = WORLDS["v3"]  # the sun top right; captions as the bundled model's last fine-tune


def check_frame_count(frames: int) -> None:
    """Refuses a frame count that is not 4k + 1 with k ≥ 1 (a ValueError naming the nearest good ones)."""
    if not isinstance(frames, int) or frames < 5 or (frames - 1) % TEMPORAL_FACTOR:
        below = (int(frames) - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1
        nearest = f"{below} or {below + TEMPORAL_FACTOR}" if below >= 5 else "5"
        raise ValueError(f"a clip has 4k + 1 frames (5, 9, 13, 17, …), not {frames}; the nearest: {nearest}")


def latent_frames(frames: int) -> int:
    """Latent frames of a Wan-family video VAE for ``frames`` = 4k + 1 frames: k + 1."""
    check_frame_count(frames)
    return (frames - 1) // TEMPORAL_FACTOR + 1


@dataclass(frozen=True)
class Clip:
    """The true attributes of a clip: its first frame's scene, the path, and when each noun appears.

    ``hat_from`` / ``sun_from``: the first frame holding a hat / sun (0: from the start), or None (never).
    """

    first: Scene  # the scene at frame 0, hat and sun as in frame 0
    end: tuple[float, float]  # the object's centre (x, y) at the last frame
    frames: int
    hat_from: int | None
    sun_from: int | None

    def center_at(self, time: float) -> tuple[float, float]:
        """The object's centre at ``time`` in frames (0 … frames − 1; fractions between frames)."""
        share = time / (self.frames - 1)
        (x0, y0), (x1, y1) = self.first.center, self.end
        return (x0 + share * (x1 - x0), y0 + share * (y1 - y0))

    def scene_at(self, frame: int) -> Scene:
        """The scene of one frame: the object where the path puts it, the nouns that have appeared."""
        if not 0 <= frame < self.frames:
            raise ValueError(f"frame {frame} is outside the clip's 0 … {self.frames - 1}")
        return replace(
            self.first,
            center=self.center_at(frame),
            hat=self.hat_from is not None and frame >= self.hat_from,
            sun=self.sun_from is not None and frame >= self.sun_from,
        )

    def scenes(self) -> list[Scene]:
        return [self.scene_at(frame) for frame in range(self.frames)]

    def anywhere(self) -> Scene:
        """The first frame's scene with every noun that appears at any frame: what a caption may name."""
        return replace(self.first, hat=self.hat_from is not None, sun=self.sun_from is not None)

    def to_json(self) -> dict:
        return {**asdict(self), "per_frame": [scene.to_json() for scene in self.scenes()]}


def _appearance(rng: np.random.Generator, noun: str, frames: int) -> int | None:
    """When a noun appears: None (absent), 0 (from the start) or a frame 1 … frames − 1."""
    present = bool(rng.random() < PRESENCE[noun])
    midway = bool(rng.random() < APPEAR_MIDWAY)
    frame = int(rng.integers(1, frames))
    return (frame if midway else 0) if present else None


def sample_clip(rng: np.random.Generator, frames: int = DEFAULT_FRAMES, **fixed) -> Clip:
    """Draws a clip; keyword arguments fix ``hat_from``, ``sun_from`` or any attribute of the first scene."""
    check_frame_count(frames)
    when = {noun: _appearance(rng, noun, frames) for noun in NOUNS}
    ends = [float(rng.uniform(*PATH_X[0])), float(rng.uniform(*PATH_X[1]))]
    if rng.random() < 0.5:  # right to left as often as left to right
        ends.reverse()
    ys = (float(rng.uniform(*PATH_Y)), float(rng.uniform(*PATH_Y)))
    for noun in NOUNS:
        when[noun] = fixed.pop(f"{noun}_from", when[noun])
    first = sample_scene(rng, CLIP_WORLD, **fixed)  # hat and sun are overwritten: they follow hat/sun_from
    first = replace(first, center=(ends[0], ys[0]), hat=when["hat"] == 0, sun=when["sun"] == 0)
    return Clip(first=first, end=(ends[1], ys[1]), frames=frames, hat_from=when["hat"], sun_from=when["sun"])


def render_frame(clip: Clip, frame: int, motion_blur: bool = False) -> np.ndarray:
    """One frame, (32, 32, 3) uint8; with ``motion_blur`` the mean of MOTION_BLUR_SAMPLES renders over
    the exposure (SHUTTER of the interval) centred on the frame's time."""
    scene = clip.scene_at(frame)
    if not motion_blur:
        return render(scene).image
    offsets = (np.arange(MOTION_BLUR_SAMPLES) + 0.5) / MOTION_BLUR_SAMPLES - 0.5  # in (−½, ½)
    times = np.clip(frame + SHUTTER * offsets, 0, clip.frames - 1)
    images = [render(replace(scene, center=clip.center_at(float(t)))).image.astype(np.float64) for t in times]
    return np.clip(np.rint(np.mean(images, axis=0)), 0, 255).astype(np.uint8)


def render_clip(clip: Clip, motion_blur: bool = False) -> np.ndarray:
    """All frames, (F, 32, 32, 3) uint8."""
    return np.stack([render_frame(clip, frame, motion_blur) for frame in range(clip.frames)])


def render_clip_with_things(clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """Frames (F, 32, 32, 3) uint8 without motion blur, and per frame the coverage (F, 32, 32) in [0, 1]
    of the hat, sun and stripes (the trainer's loss weight, as for images)."""
    frames, things = [], []
    for scene in clip.scenes():
        rendering = render(scene)
        frames.append(rendering.image)
        cover = np.zeros(rendering.image.shape[:2])
        for name in THING_REGIONS:
            if name in rendering.regions:
                cover = cover + rendering.regions[name]
        things.append(np.clip(cover, 0.0, 1.0))
    return np.stack(frames), np.stack(things)


def sample_clip_example(
    seed: int, index: int, frames: int = DEFAULT_FRAMES, world: World = CLIP_WORLD
) -> tuple[Clip, str]:
    """The ``index``-th training clip of the stream drawn from ``seed`` (resumable) and its caption."""
    rng = np.random.default_rng([seed, index, frames])
    clip = sample_clip(rng, frames)
    return clip, sample_caption(clip.anywhere(), rng, world)
