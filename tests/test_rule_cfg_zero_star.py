"""CFG-Zero* (Fan et al. 2025): the optimised scale, zeroed first steps, the negative as its base, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from negprompt.guidance import formulas
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, Term
from negprompt.guidance.rules.base import GuidanceError
from negprompt.guidance.rules.cfg_zero_star import cfg_zero_star, optimized_scale
from negprompt.interfaces.cli import main
from negprompt.session import Session


def predictions(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(3, 4, 8, 8, generator=g) for name in (UNCONDITIONAL, "positive", "negative")}


def test_optimized_scale_is_the_projection_coefficient_per_sample():
    p = predictions()
    scale = optimized_scale(p["positive"], p[UNCONDITIONAL])
    assert scale.shape == (3, 1, 1, 1)
    for b in range(3):
        y, base = p["positive"][b].flatten(), p[UNCONDITIONAL][b].flatten()
        assert float(scale[b]) == pytest.approx(float(y @ base / (base @ base)), rel=1e-5)
    # the residual ε_y − s*·ε_base is orthogonal to ε_base
    residual = p["positive"] - scale * p[UNCONDITIONAL]
    assert (residual * p[UNCONDITIONAL]).flatten(1).sum(1).abs().max() < 1e-3


def test_with_s_star_one_it_is_cfg():
    p = predictions(1)
    base = p[UNCONDITIONAL]
    # make ⟨ε_y, ε_base⟩ = ‖ε_base‖² per sample by adding a part orthogonal to ε_base to ε_base
    noise = p["negative"]
    orthogonal = formulas.perpendicular(noise, base)
    cond = base + orthogonal
    torch.testing.assert_close(cfg_zero_star(base, cond, 6.0), formulas.cfg(base, cond, 6.0), atol=1e-4, rtol=1e-5)


def test_first_steps_are_zero_then_the_negative_is_the_base():
    p = predictions(2)
    guidance = Guidance(
        rule="cfg-zero-star", positive=Term("a"), negatives=(Term("b"),), scale=5.0, settings={"zero_steps": 2}
    )
    assert torch.equal(guidance.combine(p, 0, 10), torch.zeros_like(p["positive"]))
    assert torch.equal(guidance.combine(p, 1, 10), torch.zeros_like(p["positive"]))
    torch.testing.assert_close(guidance.combine(p, 2, 10), cfg_zero_star(p["negative"], p["positive"], 5.0))
    # with the negative active, ε_∅ is not evaluated (as in rule sd); without a negative it is the base
    assert guidance.branches_at(3, 10) == ["negative", "positive"]
    plain = Guidance(rule="cfg-zero-star", positive=Term("a"), scale=5.0, settings={"zero_steps": 0})
    torch.testing.assert_close(plain.combine(p, 0, 10), cfg_zero_star(p[UNCONDITIONAL], p["positive"], 5.0))


def test_settings_are_checked():
    with pytest.raises(GuidanceError, match="cfg_zero_star_zero_steps must be ≥ 0"):
        Guidance(rule="cfg-zero-star", settings={"zero_steps": -1})
    with pytest.raises(GuidanceError, match="must be an integer"):
        Guidance(rule="cfg-zero-star", settings={"zero_steps": 1.5})
    with pytest.raises(GuidanceError, match="one negative"):
        Guidance(rule="cfg-zero-star", negatives=(Term("a"), Term("b")))


def test_runs_on_the_tiny_sd_and_differs_from_sd(tiny_sd):
    session = Session(tiny_sd)
    options = dict(steps=4, scheduler="ddim", size=32, seeds=[0])
    zero_star = session.spec("a photo of a cat", "glasses", rule="cfg-zero-star", **options)
    sd = session.spec("a photo of a cat", "glasses", rule="sd", **options)
    a, b = session.run(zero_star).pixels, session.run(sd).pixels
    assert a.shape == b.shape and torch.isfinite(torch.from_numpy(a)).all() and not (a == b).all()


def test_cli_flag_and_png_record(tiny_sd_dir, tmp_path):
    out = tmp_path / "zero.png"
    args = [
        "generate",
        "a photo of a cat",
        "-n",
        "glasses",
        "--rule",
        "cfg-zero-star",
        "--cfg-zero-star-zero-steps",
        "0",
    ]
    assert main([*args, "--model", str(tiny_sd_dir), "--steps", "3", "--size", "32", "-q", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert "Rule: cfg-zero-star" in image.text["parameters"]
        assert "cfg_zero_star_zero_steps: 0" in image.text["parameters"]
        assert json.loads(image.text["negprompt"])["settings"]["guidance"]["settings"] == {"zero_steps": 0}
