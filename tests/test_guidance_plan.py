"""Branches, windows and their meaning per rule."""

from __future__ import annotations

import math

import pytest
import torch

from negprompt.errors import NegpromptError
from negprompt.guidance import formulas
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, Term
from negprompt.guidance.windows import Window

N = 10


def preds(names, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, 3, 4, 4, generator=g) for name in names}


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "window, expected",
    [
        (Window(), (0, 10)),
        (Window(3), (3, 10)),
        (Window(0, 5), (0, 5)),
        (Window(0.5), (5, 10)),
        (Window(0.25, 0.75), (2, 7)),
        (Window(2, 1.0), (2, 10)),
    ],
)
def test_window_resolves_indices_and_fractions(window, expected):
    assert window.resolve(N) == expected


@pytest.mark.parametrize(
    "text, window",
    [
        ("5:", Window(5)),
        (":0.5", Window(0, 0.5)),
        ("0.2:0.8", Window(0.2, 0.8)),
        ("3:7", Window(3, 7)),
        (":", Window()),
    ],
)
def test_window_parse(text, window):
    assert Window.parse(text) == window


@pytest.mark.parametrize("window", [Window(5, 5), Window(7, 3), Window(0.6, 0.5), Window(0, 11), Window(12)])
def test_window_outside_schedule_or_empty_is_an_error(window):
    with pytest.raises(NegpromptError):
        window.resolve(N)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Window(-1),
        lambda: Window(0, 1.5),
        lambda: Window(math.nan),
        lambda: Window.parse("x:3"),
        lambda: Window.parse("5"),
    ],
)
def test_window_bad_values(bad):
    with pytest.raises(NegpromptError):
        bad()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Guidance(rule="nope"), "unknown rule"),
        (lambda: Guidance(scale=math.nan), "finite"),
        (lambda: Guidance(scale=math.inf), "finite"),
        (lambda: Guidance(rule="dual", negatives=(Term("x", math.nan),)), "finite"),
        (lambda: Guidance(rule="cfg", negatives=(Term("x"),)), "no negative"),
        (lambda: Guidance(rule="sd", negatives=(Term("x"), Term("y"))), "one negative"),
        (lambda: Guidance(rule="sd", negatives=(Term("x", 3.0),)), "one scale"),
        (lambda: Guidance(rule="dual", extra_positives=(Term("x"),)), "weighted"),
    ],
)
def test_invalid_guidance(make, message):
    with pytest.raises(NegpromptError, match=message):
        make()


def test_window_outside_the_schedule_is_reported_by_validate():
    guidance = Guidance(negatives=(Term("x", window=Window(3, 20)),))
    with pytest.raises(NegpromptError, match="outside the schedule"):
        guidance.validate(N)


# ---------------------------------------------------------------- branches


def test_sd_rule_needs_no_unconditional_branch_while_the_negative_is_active():
    guidance = Guidance(positive=Term("a"), negatives=(Term("b", window=Window(4)),))
    assert guidance.branches_at(0, N) == [UNCONDITIONAL, "positive"]
    assert guidance.branches_at(4, N) == ["negative", "positive"]
    assert guidance.branches_at(9, N) == ["negative", "positive"]


def test_dual_rule_evaluates_three_branches_only_inside_the_window():
    guidance = Guidance(rule="dual", positive=Term("a"), negatives=(Term("b", 2.0, Window(0.5)),))
    assert guidance.branches_at(4, N) == [UNCONDITIONAL, "positive"]
    assert guidance.branches_at(5, N) == [UNCONDITIONAL, "negative", "positive"]


def test_weighted_rule_names_every_branch():
    guidance = Guidance(
        rule="weighted",
        positive=Term("a"),
        extra_positives=(Term("c", 2.0),),
        negatives=(Term("b", 3.0), Term("d", 1.0, Window(0, 3))),
    )
    assert guidance.branches_at(0, N) == [UNCONDITIONAL, "negative", "negative_2", "positive", "positive_2"]
    assert guidance.branches_at(5, N) == [UNCONDITIONAL, "negative", "positive", "positive_2"]


# ---------------------------------------------------------------- combination


def test_sd_rule_outside_the_window_is_plain_cfg():
    guidance = Guidance(scale=6.0, positive=Term("a"), negatives=(Term("b", window=Window(5)),))
    p = preds([UNCONDITIONAL, "positive"])
    torch.testing.assert_close(guidance.combine(p, 2, N), formulas.cfg(p[UNCONDITIONAL], p["positive"], 6.0))
    q = preds(["negative", "positive"], seed=1)
    torch.testing.assert_close(guidance.combine(q, 7, N), formulas.sd_negative(q["negative"], q["positive"], 6.0))


def test_default_negative_scales_make_every_rule_agree_with_sd():
    p = preds([UNCONDITIONAL, "negative", "positive"])
    expected = formulas.sd_negative(p["negative"], p["positive"], 7.5)
    for rule in ("sd", "dual", "weighted"):
        guidance = Guidance(rule=rule, positive=Term("a"), negatives=(Term("b"),), scale=7.5)
        torch.testing.assert_close(guidance.combine(p, 0, N), expected, atol=1e-5, rtol=1e-5)


def test_dual_rule_uses_its_own_negative_scale():
    p = preds([UNCONDITIONAL, "negative", "positive"])
    guidance = Guidance(rule="dual", positive=Term("a"), negatives=(Term("b", 2.0),), scale=5.0)
    expected = formulas.dual_scale(p[UNCONDITIONAL], p["positive"], p["negative"], 5.0, 2.0)
    torch.testing.assert_close(guidance.combine(p, 0, N), expected)


def test_weighted_term_outside_its_window_drops_out():
    guidance = Guidance(rule="weighted", positive=Term("a"), negatives=(Term("b", 2.0, Window(0, 3)),), scale=4.0)
    p = preds([UNCONDITIONAL, "negative", "positive"])
    inside = guidance.combine(p, 1, N)
    outside = guidance.combine({k: v for k, v in p.items() if k != "negative"}, 5, N)
    torch.testing.assert_close(outside, formulas.cfg(p[UNCONDITIONAL], p["positive"], 4.0))
    assert not torch.allclose(inside, outside)


def test_cfg_positive_outside_its_window_is_unconditional():
    guidance = Guidance(rule="cfg", positive=Term("a", window=Window(3)))
    p = preds([UNCONDITIONAL])
    assert guidance.branches_at(0, N) == [UNCONDITIONAL]
    assert torch.equal(guidance.combine(p, 0, N), p[UNCONDITIONAL])


def test_json_round_trip():
    guidance = Guidance(
        rule="weighted",
        positive=Term(("a", "b")),
        negatives=(Term("x", 2.5, Window(0.25, 0.75)), Term("y", None, Window(3))),
        extra_positives=(Term("z", 1.5),),
        scale=6.0,
    )
    assert Guidance.from_json(guidance.to_json()) == guidance
