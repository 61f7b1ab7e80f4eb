"""The bundled shapes-world model: it loads offline, draws what is asked, and the demo runs.

A fast smoke test, not the evaluation (``negprompt evaluate``, docs/evaluation.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from negprompt.api import generate, to_uint8
from negprompt.interfaces.cli import main
from negprompt.interfaces.demo import DEMO_PAIRS
from negprompt.models.loading import BUNDLED_PATH
from negprompt.session import Session
from negprompt.shapes.detectors import detect
from negprompt.shapes.scene import COLORS, SHAPES
from negprompt.shapes.training import DECLARATIONS, DEFAULT_SAMPLING

PROMPTS = [(c, s) for s in SHAPES for c in COLORS]  # 12 combinations


@pytest.fixture(scope="module")
def bundled():
    return Session().components


def test_bundled_model_is_small_safetensors_and_pixel_space(bundled):
    size = sum(p.stat().st_size for p in BUNDLED_PATH.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not any(p.suffix in (".bin", ".ckpt", ".pt", ".pth") for p in BUNDLED_PATH.rglob("*"))
    assert bundled.vae is None and bundled.default_size == 32
    defaults = json.loads((BUNDLED_PATH / "negprompt.json").read_text())
    assert defaults == {**DEFAULT_SAMPLING, **DECLARATIONS}  # what `negprompt train` exports
    assert set(defaults) == {"scheduler", "steps", "scale", "region_finder", "max_sigma", "demo_pairs"}


def test_bundled_model_draws_the_named_color_and_shape(bundled):
    result = generate(tuple(f"a {c} {s}" for c, s in PROMPTS), seeds=range(len(PROMPTS)), rule="cfg", model=bundled)
    found = [detect(image) for image in to_uint8(result.pixels)]
    colors = sum(f.color == c for f, (c, _) in zip(found, PROMPTS))
    shapes = sum(f.shape == s for f, (_, s) in zip(found, PROMPTS))
    assert colors >= 10 and shapes >= 9, (colors, shapes)


def test_bundled_model_negative_removes_the_hat(bundled):
    prompts = tuple(f"a {c} {s} with a hat" for c, s in PROMPTS)
    with_hat = generate(prompts, seeds=range(12), rule="cfg", model=bundled)
    hats = sum(detect(image).hat for image in to_uint8(with_hat.pixels))
    plain = tuple(f"a {c} {s}" for c, s in PROMPTS)
    without = generate(plain, negative="a hat", seeds=range(12), model=bundled)
    remaining = sum(detect(image).hat for image in to_uint8(without.pixels))
    assert hats >= 9 and remaining <= 2, (hats, remaining)


def test_same_seed_is_bit_identical(bundled):
    first = generate("a red circle", negative="a hat", seeds=[5], model=bundled).pixels
    second = generate("a red circle", negative="a hat", seeds=[5], model=bundled).pixels
    assert np.array_equal(first, second)


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "demo.png" in out and (tmp_path / "demo.png").exists()
    record = json.loads((tmp_path / "demo.json").read_text())
    assert len(record["variants"]) == 3 and record["variants"][2]["guidance"]["negatives"][0]["window"] == [0.25, None]
    assert [(p["prompt"], p["negative"]) for p in record["pairs"]] == list(DEMO_PAIRS)  # declared = the fallback


def test_unknown_word_with_the_bundled_model(tmp_path, capsys):
    code = main(["generate", "a red dragon", "-q", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "'dragon'" in err and "known words:" in err and not (tmp_path / "x.png").exists()
