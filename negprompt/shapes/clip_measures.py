"""The image detectors on clips: their validation on rendered frames, and temporal measures of negatives.

Validation (:func:`validate_clip_frames`) follows the stress suite's procedure (docs/detectors.md,
:mod:`negprompt.shapes.stress`): render with the truth known, perturb, detect every frame, and count per
attribute how many readings were right, wrong or unreadable; here also per clip how many readings
change between neighbouring frames where the truth does not (flicker of the detectors themselves).

Temporal measures of a negative, from the per-frame detections of the same clips without and with it
(lists of clips, each a list of :class:`~negprompt.shapes.detectors.Detection` per frame):

- :func:`removal_per_frame`: at each frame, the share of clips holding the thing without the negative
  that do not hold it with the negative (the image removal of ``negprompt bench-methods``, per frame);
- :func:`first_appearance`: the first frame a thing is read present (None: never), so a negated hat that
  still comes in late is told from one that never comes;
- :func:`flicker`: changes of a reading between neighbouring frames (a stable clip has 0).

Unreadable frames (washed out) are left out of every rate and counted apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from negprompt.shapes.clips import DEFAULT_FRAMES, render_clip, sample_clip
from negprompt.shapes.detectors import ATTRIBUTES, UNREADABLE, Detection, detect

Reading = bool | str | None  # an attribute read from one frame; None: unreadable


def readings(detections: Sequence[Detection], attribute: str) -> list[Reading]:
    """One attribute per frame; None where the frame could not be read."""
    return [None if d.unreadable(attribute) else getattr(d, attribute) for d in detections]


def first_appearance(detections: Sequence[Detection], thing: str) -> int | None:
    """The first frame where ``thing`` (hat, sun, striped, blurry) is read present; None if never."""
    return next((frame for frame, value in enumerate(readings(detections, thing)) if value is True), None)


def flicker(detections: Sequence[Detection], attribute: str) -> int:
    """How often the reading changes between neighbouring readable frames (unreadable frames are skipped)."""
    known = [value for value in readings(detections, attribute) if value is not None]
    return sum(a != b for a, b in zip(known, known[1:]))


def removal_per_frame(
    plain: Sequence[Sequence[Detection]], negated: Sequence[Sequence[Detection]], thing: str
) -> list[float]:
    """Per frame, the share of clips whose plain frame holds ``thing`` and whose negated frame does not,
    over the clips whose plain frame holds it and whose negated frame is readable; NaN where none do."""
    if len(plain) != len(negated) or any(len(a) != len(b) for a, b in zip(plain, negated)):
        raise ValueError("removal compares the same clips, frame by frame: give lists of equal shape")
    frames = len(plain[0]) if plain else 0
    rates = []
    for frame in range(frames):
        outcomes = [
            n[frame].unreadable(thing) or getattr(n[frame], thing) is False
            for p, n in zip(plain, negated)
            if not p[frame].unreadable(thing) and getattr(p[frame], thing) is True and not n[frame].unreadable(thing)
        ]
        rates.append(float(np.mean(outcomes)) if outcomes else float("nan"))
    return rates


def summarize_negative(
    plain: Sequence[Sequence[Detection]], negated: Sequence[Sequence[Detection]], thing: str
) -> dict:
    """Removal per frame and over whole clips, when the thing first appears, and flicker, without and with
    the negative: the numbers a video evaluation row would report."""
    had = [i for i, clip in enumerate(plain) if first_appearance(clip, thing) is not None]
    gone = [first_appearance(negated[i], thing) is None for i in had]
    late = [
        first_appearance(negated[i], thing) - first_appearance(plain[i], thing)
        for i in had
        if first_appearance(negated[i], thing) is not None
    ]
    return {
        "thing": thing,
        "clips": len(plain),
        "had_thing": len(had),
        "removal_per_frame": removal_per_frame(plain, negated, thing),
        "removal_whole_clip": float(np.mean(gone)) if gone else float("nan"),
        "mean_frames_later": float(np.mean(late)) if late else float("nan"),
        "flicker_plain": float(np.mean([flicker(clip, thing) for clip in plain])) if plain else float("nan"),
        "flicker_negated": float(np.mean([flicker(clip, thing) for clip in negated])) if negated else float("nan"),
        "unreadable_frames": sum(d.unreadable(thing) for clip in negated for d in clip),
    }


def _truth(clip, frame: int) -> dict[str, object]:
    scene = clip.scene_at(frame)
    truth = {name: getattr(scene, name) for name in ATTRIBUTES if name != "impossible"}
    truth["impossible"] = False  # a clip's frame holds at most one hat and one sun
    return truth


def validate_clip_frames(
    clips: int, seed: int = 0, frames: int = DEFAULT_FRAMES, motion_blur: bool = False, noise: float = 0.0
) -> dict:
    """Detects every frame of ``clips`` rendered clips; counts per attribute right / wrong / unreadable
    readings, and the flicker of each reading where the truth is constant (sum over clips)."""
    rng = np.random.default_rng([seed, frames, int(motion_blur), int(noise * 10)])
    counts = {name: {"right": 0, "wrong": 0, "unreadable": 0, "flicker": 0} for name in ATTRIBUTES}
    unreadable_frames = 0
    for _ in range(clips):
        clip = sample_clip(rng, frames)
        images = render_clip(clip, motion_blur).astype(np.float64)
        if noise:
            images = images + rng.normal(0.0, noise, images.shape)
        detections = [detect(np.clip(np.rint(image), 0, 255).astype(np.uint8)) for image in images]
        unreadable_frames += sum(any(d.unreadable(name) for name in ATTRIBUTES) for d in detections)
        for name in ATTRIBUTES:
            truths = [_truth(clip, frame)[name] for frame in range(frames)]
            for frame, detection in enumerate(detections):
                read = getattr(detection, name)
                outcome = "unreadable" if read is UNREADABLE else "right" if read == truths[frame] else "wrong"
                counts[name][outcome] += 1
            if len(set(truths)) == 1:
                counts[name]["flicker"] += flicker(detections, name)
    return {
        "clips": clips,
        "frames": frames,
        "motion_blur": motion_blur,
        "noise": noise,
        "unreadable_frames": unreadable_frames,
        "attributes": counts,
    }
