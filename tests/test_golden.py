"""Behaviour kept: images and attention numbers equal, bit for bit, those recorded before the refactor."""

from __future__ import annotations

import json

import pytest
from golden_cases import ATTENTION_CASES, GOLDEN_FILE, IMAGE_CASES, render_attention_case, render_image_case

GOLDENS = json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_images_are_bit_identical_to_the_goldens(name, tiny_sd):
    assert render_image_case(name, tiny_sd) == GOLDENS["images"][name]


@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_attention_numbers_are_bit_identical_to_the_goldens(name, tiny_sd):
    got, want = render_attention_case(name, tiny_sd), GOLDENS["attention"][name]
    for key in ("pixels", "tensors", "related", "article", "released", "summary"):
        # JSON text: floats compared exactly, NaN (a map with no mass has no centroid) equal to NaN
        assert json.dumps(got[key]) == json.dumps(want[key]), key
