"""Identities of the guidance rules (the article's equations (1), (2)/(9), (8), and Composable Diffusion's weighted form)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from negprompt.guidance import formulas

SHAPE = (2, 4, 8, 8)


def branches(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g).to(dtype) for _ in range(3)]


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(-20, 20, allow_nan=False), seed=st.integers(0, 10_000))
def test_dual_with_s_minus_equal_s_plus_minus_one_is_sd_rule(scale, seed):
    """Eq. (8) with s⁻ = s⁺ − 1 reduces to eq. (9)."""
    uncond, cond, neg = branches(seed)
    three = formulas.dual_scale(uncond, cond, neg, scale, scale - 1)
    two = formulas.sd_negative(neg, cond, scale)
    torch.testing.assert_close(three, two, atol=1e-4 * (1 + abs(scale)), rtol=1e-5)


def test_dual_with_other_s_minus_differs_from_sd_rule():
    uncond, cond, neg = branches(1)
    assert not torch.allclose(formulas.dual_scale(uncond, cond, neg, 7.5, 3.0), formulas.sd_negative(neg, cond, 7.5))


def test_scale_one_gives_the_conditional_prediction():
    uncond, cond, neg = branches(2)
    torch.testing.assert_close(formulas.cfg(uncond, cond, 1.0), cond)
    torch.testing.assert_close(formulas.sd_negative(neg, cond, 1.0), cond)
    torch.testing.assert_close(formulas.dual_scale(uncond, cond, neg, 1.0, 0.0), cond)


def test_scale_zero_gives_the_unconditional_or_negative_prediction():
    uncond, cond, neg = branches(3)
    torch.testing.assert_close(formulas.cfg(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(formulas.sd_negative(neg, cond, 0.0), neg)


@pytest.mark.parametrize(
    "rule",
    [
        lambda u, c, n: formulas.cfg(u, c, 7.5),
        lambda u, c, n: formulas.sd_negative(n, c, 5.0),
        lambda u, c, n: formulas.dual_scale(u, c, n, 6.0, 2.5),
        lambda u, c, n: formulas.weighted_sum(u, [c, n], [4.0, -1.5]),
    ],
    ids=["cfg", "sd", "dual", "weighted"],
)
def test_rules_are_linear_in_the_predictions(rule):
    a, b = branches(4), branches(5)
    alpha, beta = 0.7, -1.3
    mixed = [alpha * x + beta * y for x, y in zip(a, b)]
    torch.testing.assert_close(rule(*mixed), alpha * rule(*a) + beta * rule(*b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_shapes_and_dtypes_are_preserved(dtype):
    uncond, cond, neg = branches(6, dtype)
    outputs = [
        formulas.cfg(uncond, cond, 7.5),
        formulas.sd_negative(neg, cond, 7.5),
        formulas.dual_scale(uncond, cond, neg, 7.5, 3.0),
        formulas.weighted_sum(uncond, [cond, neg], [7.5, -3.0]),
    ]
    for out in outputs:
        assert out.shape == SHAPE and out.dtype == dtype


def test_inputs_are_not_modified():
    uncond, cond, neg = branches(7)
    copies = [x.clone() for x in (uncond, cond, neg)]
    formulas.weighted_sum(uncond, [cond, neg], [3.0, -2.0])
    formulas.dual_scale(uncond, cond, neg, 3.0, 2.0)
    for original, copy in zip((uncond, cond, neg), copies):
        assert torch.equal(original, copy)


def test_weighted_sum_generalises_cfg_and_the_sd_rule():
    uncond, cond, neg = branches(8)
    torch.testing.assert_close(formulas.weighted_sum(uncond, [cond], [7.5]), formulas.cfg(uncond, cond, 7.5))
    torch.testing.assert_close(
        formulas.weighted_sum(uncond, [cond, neg], [7.5, -6.5]),
        formulas.sd_negative(neg, cond, 7.5),
        atol=1e-4,
        rtol=1e-5,
    )
    torch.testing.assert_close(formulas.weighted_sum(uncond, [], []), uncond)


def test_weighted_sum_with_several_negatives_subtracts_each():
    uncond, cond, neg = branches(9)
    neg2 = neg.flip(-1)
    expected = uncond + 5 * (cond - uncond) - 2 * (neg - uncond) - 1 * (neg2 - uncond)
    torch.testing.assert_close(
        formulas.weighted_sum(uncond, [cond, neg, neg2], [5, -2, -1]), expected, atol=1e-5, rtol=1e-5
    )


def test_weighted_sum_needs_one_weight_per_prediction():
    uncond, cond, neg = branches(10)
    with pytest.raises(ValueError, match="one weight each"):
        formulas.weighted_sum(uncond, [cond, neg], [1.0])
