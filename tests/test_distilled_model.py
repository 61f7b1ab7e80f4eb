"""The bundled guidance-distilled model ("shapes-distilled"): one pass a step approximates its teacher's CFG.

The student was trained with `negprompt train --distill-from shapes` (docs/training.md, "Guidance
distillation"); the full check is `python scripts/distill_check.py --student shapes-distilled`.
Here a few held-out seeds (not the training stream's: the sampler's noise) bound the same measures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from negprompt.api import to_uint8
from negprompt.models.loading import BUNDLED_MODELS, DISTILLED_NAME
from negprompt.session import Session
from negprompt.shapes.detectors import detect
from negprompt.shapes.scene import COLORS, SHAPES

PROMPTS = tuple(f"a {c} {s}" for s in SHAPES for c in COLORS)[::2]  # 6 of the 12 combinations
SEEDS = list(range(300_000, 300_000 + len(PROMPTS)))
W = 5.0


@pytest.fixture(scope="module")
def sessions():
    return Session("shapes"), Session(DISTILLED_NAME)


def test_distilled_model_is_shipped_beside_the_bundled_one(sessions):
    folder = BUNDLED_MODELS[DISTILLED_NAME]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not any(p.suffix in (".bin", ".ckpt", ".pt", ".pth") for p in folder.rglob("*"))
    declared = json.loads((folder / "negprompt.json").read_text())
    assert declared["scale"] == 1.0 and declared["embedded_guidance"] == W
    _, student = sessions
    assert student.components.unet.config.time_cond_proj_dim
    assert student.spec("a red circle").model == DISTILLED_NAME  # recorded by name, re-runnable anywhere


def test_one_pass_approximates_the_teachers_cfg_on_held_out_seeds(sessions):
    teacher, student = sessions
    guided = teacher.run(teacher.spec(PROMPTS, rule="cfg", scale=W, seeds=SEEDS)).pixels
    rows: list[int] = []
    hook = student.components.unet.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        one_pass = student.run(student.spec(PROMPTS, seeds=SEEDS))  # declared: scale 1, embedded w = 5
    finally:
        hook.remove()
    assert sum(rows) == len(PROMPTS) * student.denoiser_calls()  # one UNet row per image and step
    unguided = teacher.run(teacher.spec(PROMPTS, rule="cfg", scale=1, seeds=SEEDS)).pixels
    difference = float(np.abs(guided - one_pass.pixels).mean())
    start = float(np.abs(guided - unguided).mean())
    # 24 held-out images: 0.016 against 0.037 for the unguided start (docs/training/distill-check.json).
    assert difference <= 0.03 and difference <= 0.6 * start, (difference, start)
    for a, b in zip(guided, one_pass.pixels):
        found_a, found_b = detect(to_uint8(a)), detect(to_uint8(b))
        assert (found_a.color, found_a.shape) == (found_b.color, found_b.shape)


def test_a_plain_negative_cannot_act_but_negatives_in_attention_do(sessions):
    _, student = sessions
    prompts = tuple(f"{p} with a hat" for p in PROMPTS)
    plain = student.run(student.spec(prompts, seeds=SEEDS)).pixels
    negated = student.run(student.spec(prompts, negative="a hat", seeds=SEEDS)).pixels
    assert np.array_equal(plain, negated)  # rule sd at scale 1: ε̂ = ε_y, the negative has no branch
    vsf = student.run(student.spec(prompts, negative="a hat", rule="vsf", seeds=SEEDS)).pixels
    hats = sum(detect(image).hat for image in to_uint8(plain))
    remaining = sum(detect(image).hat for image in to_uint8(vsf))
    assert hats >= 5 and remaining <= hats // 2, (hats, remaining)  # measured on 12 seeds: 12 → 0
    # NAG at the paper's settings moves the image but cannot undo a hat the prompt asks for (12 → 12
    # on 12 seeds); against unasked hats it acts (docs/methods/distilled).
    nag = student.run(student.spec(prompts, negative="a hat", rule="nag", seeds=SEEDS)).pixels
    assert float(np.abs(nag - plain).mean()) > 1e-3
