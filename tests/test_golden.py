"""Behaviour kept: images and attention numbers equal those recorded before the refactor — within the
stated tolerances on any machine, bit for bit on the machine that recorded them (tests/golden/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
from golden_cases import (
    ATTENTION_CASES,
    IMAGE_CASES,
    MODELS,
    TOLERANCES,
    Tolerance,
    compare,
    load_goldens,
    machine,
    render_attention_case,
    render_image_case,
)

GOLDENS, RECORD = load_goldens()
ON_THE_RECORDING_MACHINE = machine() == RECORD["recorded_on"]
EXACT_CHECKS: list[str] = []  # cases checked bit for bit in this run (reported by conftest's summary)


@pytest.fixture
def models(request):
    """The tiny models by case name, each the session's shared fixture (built once per test run)."""

    class Models:
        def __getitem__(self, name: str):
            return request.getfixturevalue(MODELS[name])

    return Models()


def assert_as_recorded(name: str, arrays: dict[str, np.ndarray]) -> None:
    results = compare(arrays, GOLDENS)
    assert set(results) == {key for key in GOLDENS if key in arrays} and results, name
    assert set(arrays) == {key for key in GOLDENS if key.split("/")[1] == name}, "the case renders other arrays"
    over = {key: round(excess, 3) for key, (excess, _) in results.items() if not excess <= 1.0}
    assert not over, f"over the tolerance (in units of it): {over}"
    if ON_THE_RECORDING_MACHINE:  # same CPU, kernels, threads and versions: the same bits
        changed = [key for key, (_, identical) in results.items() if not identical]
        assert not changed, f"within tolerance but not bit-identical on the recording machine: {changed}"
        EXACT_CHECKS.append(name)


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_images_equal_the_goldens(name, models):
    assert_as_recorded(name, render_image_case(name, models))


@pytest.mark.parametrize("name", sorted(ATTENTION_CASES))
def test_attention_numbers_equal_the_goldens(name, models):
    arrays, labels = render_attention_case(name, models)
    assert labels == RECORD["labels"][name]  # the same rows (branch, word, step, image) and related words
    assert_as_recorded(name, arrays)


def test_the_tolerance_rule_fails_what_it_should():
    pixels = TOLERANCES["pixels"]
    want = np.full((2, 2), 0.5, np.float32)
    assert pixels.excess(want + 5e-5, want) <= 1 < pixels.excess(want + 1 / 255, want)
    assert pixels.excess(want[:1], want) == float("inf")  # another shape
    maps = TOLERANCES["maps"]
    peak = np.array([0.0, 1e-3, 0.5], np.float16)
    assert maps.excess(peak + np.float16(2.0**-10), peak) <= 1 < maps.excess(peak * 1.01, peak)
    with_nan = np.array([np.nan, 1.0])
    assert TOLERANCES["positions"].excess(with_nan, with_nan) == 0.0
    assert TOLERANCES["positions"].excess(np.array([0.3, 1.0]), with_nan) == float("inf")  # NaN meets NaN only
    assert TOLERANCES["exact"].excess(np.array([True]), np.array([False])) == float("inf")
    assert Tolerance(relative=1e-5).excess(np.array([0.0]), np.array([0.0])) == 0.0


def test_the_record_holds_every_case_and_its_tolerances():
    cases = {key.split("/")[1] for key in GOLDENS}
    assert cases == set(IMAGE_CASES) | set(ATTENTION_CASES)
    assert set(RECORD["digests"]) == set(GOLDENS)
    assert RECORD["tolerances"] == {name: vars(t) for name, t in TOLERANCES.items()}
