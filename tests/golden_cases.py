"""Golden outputs: images and attention numbers recorded before the core was refactored.

``python tests/golden_cases.py --write`` records ``tests/golden/goldens.json`` (only when behaviour is
meant to change); ``tests/test_golden.py`` renders every case again and asserts bit-identity.
Each case is small enough for CI: the tiny SD at 32 px and the bundled model at a few steps.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

GOLDEN_FILE = Path(__file__).parent / "golden" / "goldens.json"
TINY_PROMPT, TINY_NEGATIVE = "a photo of a woman in the street", "red glasses"

# name → (model, options of Session.spec); model "tiny" is the tiny SD of conftest, "shapes" the bundled one.
IMAGE_CASES: dict[str, tuple[str, dict]] = {
    "tiny-sd-ddim": ("tiny", dict(negative=TINY_NEGATIVE, scheduler="ddim", steps=6, seeds=[0, 1])),
    "tiny-sd-default-scale5": ("tiny", dict(negative=TINY_NEGATIVE, steps=5, seeds=[2], scale=5.0)),
    "tiny-cfg-rescale-interval-lms": (
        "tiny",
        dict(rule="cfg", scheduler="lms", steps=6, seeds=[3], rescale=0.7, interval="1:5"),
    ),
    "tiny-dual-window-euler-a": (
        "tiny",
        dict(
            negative=TINY_NEGATIVE, rule="dual", scheduler="euler-a", steps=6, seeds=[4, 5], negative_windows=["0.3:"]
        ),
    ),
    "tiny-weighted-two-negatives-dpm": (
        "tiny",
        dict(
            negative=["red glasses", "a dog"],
            rule="weighted",
            negative_scales=[3.0, None],
            scheduler="dpm++2m",
            steps=6,
            seeds=[6],
        ),
    ),
    "tiny-perp-neg-pndm": ("tiny", dict(negative=["red glasses", "a hat"], rule="perp-neg", steps=5, seeds=[7])),
    "tiny-dng-euler": ("tiny", dict(negative=TINY_NEGATIVE, rule="dng", scheduler="euler", steps=6, seeds=[8])),
    "tiny-apg-momentum-ddim": (
        "tiny",
        dict(
            negative=TINY_NEGATIVE,
            rule="apg",
            scheduler="ddim",
            steps=6,
            seeds=[9],
            rule_settings=dict(eta=0.5, norm_threshold=2.0, momentum=-0.5),
        ),
    ),
    "tiny-syntax-unipc": (
        "tiny",
        dict(negative="[red:(glasses:1.3):2]", scheduler="unipc", steps=6, seeds=[10], eta=0.0),
    ),
    "tiny-interval-sigma-heun": (
        "tiny",
        dict(negative=TINY_NEGATIVE, scheduler="heun", steps=4, seeds=[11], interval_sigma=(0.5, 5.0)),
    ),
    "shapes-default": ("shapes", dict(negative="a hat", steps=8, seeds=[0, 1])),
    "shapes-delayed": ("shapes", dict(negative="a hat", steps=8, seeds=[0], negative_windows=["0.25:"])),
}
SHAPES_PROMPT = "a red circle with a hat"

# attention cases: (model, options, words per branch)
ATTENTION_CASES: dict[str, tuple[str, dict, dict]] = {
    "tiny-attention": (
        "tiny",
        dict(negative=TINY_NEGATIVE, scheduler="ddim", steps=5, seeds=[1, 2], negative_windows=["2:"]),
        {"positive": ["woman", "street"], "negative": ["glasses"]},
    ),
    "shapes-attention": (
        "shapes",
        dict(negative="a hat", steps=6, seeds=[0]),
        {"positive": ["red", "circle", "hat"], "negative": ["hat"]},
    ),
}


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _model(name: str, tiny_sd):
    from negprompt.session import Session

    return Session(tiny_sd if name == "tiny" else "shapes", device="cpu", dtype="float32")


def _settings(model: str, options: dict, tiny_sd):
    """Spec and session of a case, through the public API of the version under test."""

    prompt = TINY_PROMPT if model == "tiny" else SHAPES_PROMPT
    size = 32 if model == "tiny" else None
    session = _model(model, tiny_sd)
    return session.spec(prompt, size=size, **options), session


def render_image_case(name: str, tiny_sd) -> dict:
    from negprompt.api import to_uint8

    model, options = IMAGE_CASES[name]
    settings, session = _settings(model, options, tiny_sd)
    pixels = session.run(settings).pixels
    return {"float32": _digest(pixels.astype(np.float32)), "uint8": _digest(to_uint8(pixels))}


def render_attention_case(name: str, tiny_sd) -> dict:
    from negprompt.analysis.attention_stats import reduce_layer, summarize
    from negprompt.analysis.strength import strength_curves
    from negprompt.attention.capture import CaptureRequest
    from negprompt.attention.result import capture

    model, options, words = ATTENTION_CASES[name]
    settings, session = _settings(model, options, tiny_sd)
    result = capture(settings, CaptureRequest(words=words), session, trace=False, reducer=reduce_layer)
    curves = strength_curves(result, words["negative"][-1])
    return {
        "pixels": _digest(result.generation.pixels.astype(np.float32)),
        "tensors": {key: _digest(value.numpy()) for key, value in sorted(result.tensors.items())},
        "summary": [
            {
                k: row[k]
                for k in ("branch", "word", "step", "image", "mass", "frobenius_sum", "centroid_x", "centroid_y")
            }
            for row in summarize(result)
        ],
        "article": [float(x) for x in curves["article"].flatten()],
        "released": [float(x) for x in curves["released"].flatten()],
        "related": list(curves["related"]),
    }


def render_all(tiny_sd) -> dict:
    return {
        "images": {name: render_image_case(name, tiny_sd) for name in IMAGE_CASES},
        "attention": {name: render_attention_case(name, tiny_sd) for name in ATTENTION_CASES},
    }


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/golden_cases.py --write   (records tests/golden/goldens.json)")
    torch.set_num_threads(2)
    from negprompt.models.tiny_sd import build_tiny_sd

    goldens = render_all(build_tiny_sd(seed=0))
    GOLDEN_FILE.parent.mkdir(exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}")
