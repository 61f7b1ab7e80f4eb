"""Perp-Neg, DNG, guidance rescale, guidance interval and APG: identities and settings."""

from __future__ import annotations

import math

import pytest
import torch

from negprompt.errors import NegpromptError
from negprompt.guidance import formulas
from negprompt.guidance.plan import UNCONDITIONAL, Guidance, Term
from negprompt.guidance.rules.apg import APGSettings
from negprompt.guidance.rules.dng import DNGSettings, posterior
from negprompt.guidance.windows import Window
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import make_scheduler


def branches(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 8, 8, generator=g) for _ in range(3)]


def test_perp_neg_with_a_negative_parallel_to_the_positive_removes_nothing():
    uncond, cond, _ = branches(0)
    factors = torch.tensor([0.5, -2.0, 3.0]).view(3, 1, 1, 1)  # per sample: the dot product is per sample
    parallel_negative = uncond + factors * (cond - uncond)
    torch.testing.assert_close(
        formulas.perp_neg(uncond, cond, [parallel_negative], 7.5, [1.0]),
        formulas.cfg(uncond, cond, 7.5),
        atol=1e-4,
        rtol=1e-5,
    )


def test_perp_neg_subtracts_the_orthogonal_part_per_sample():
    uncond, cond, neg = branches(1)
    out = formulas.perp_neg(uncond, cond, [neg], 5.0, [2.0])
    delta = cond - uncond
    removed = (formulas.cfg(uncond, cond, 5.0) - out) / (5.0 * 2.0)
    dots = (removed * delta).flatten(1).sum(1)
    torch.testing.assert_close(dots, torch.zeros(3), atol=1e-3, rtol=0)  # orthogonal to Δ₀ in each sample


def test_rescale_phi_zero_is_the_identity_and_one_matches_the_conditional_std():
    uncond, cond, neg = branches(2)
    guided = formulas.sd_negative(neg, cond, 7.5)
    assert torch.equal(formulas.rescale(guided, cond, 0.0), guided)
    full = formulas.rescale(guided, cond, 1.0)
    torch.testing.assert_close(formulas.per_sample_std(full), formulas.per_sample_std(cond))


def test_apg_with_eta_one_and_no_clipping_is_cfg():
    uncond, cond, neg = branches(3)
    guided, _ = formulas.projected(neg, cond, 6.0, eta=1.0)
    torch.testing.assert_close(guided, formulas.sd_negative(neg, cond, 6.0), atol=1e-4, rtol=1e-5)


def test_apg_parallel_part_is_removed_with_eta_zero():
    uncond, cond, neg = branches(4)
    guided, _ = formulas.projected(uncond, cond, 6.0, eta=0.0)
    update = (guided - cond) / 5.0
    torch.testing.assert_close((update * cond).flatten(1).sum(1), torch.zeros(3), atol=1e-3, rtol=0)


def test_apg_norm_threshold_clips_the_update():
    uncond, cond, neg = branches(5)
    guided, _ = formulas.projected(uncond, cond, 2.0, eta=1.0, norm_threshold=0.5)
    assert ((guided - cond).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()


def test_interval_outside_is_the_plain_conditional_prediction():
    guidance = Guidance(rule="dual", positive=Term("a"), negatives=(Term("b", 2.0),), interval=Window(3, 6))
    p = dict(zip([UNCONDITIONAL, "negative", "positive"], branches(6)))
    assert guidance.branches_at(1, 10) == ["positive"]
    assert guidance.branches_at(4, 10) == [UNCONDITIONAL, "negative", "positive"]
    assert torch.equal(guidance.combine({"positive": p["positive"]}, 1, 10), p["positive"])


def test_dng_with_zero_strength_is_cfg():
    uncond, cond, neg = branches(7)
    out = formulas.dynamic_negative(uncond, cond, neg, 7.5, 0.0, torch.full((3,), 0.5))
    torch.testing.assert_close(out, formulas.cfg(uncond, cond, 7.5))


def test_dng_log_odds_rise_when_the_sample_follows_the_negative():
    uncond, _, neg = branches(8)
    towards_negative = formulas.dng_log_odds_step(neg, uncond, neg, 0.5, 0.6)
    towards_unconditional = formulas.dng_log_odds_step(uncond, uncond, neg, 0.5, 0.6)
    assert (towards_negative > 0).all() and (towards_unconditional < 0).all()


def test_dng_posterior_stays_within_its_clamp_during_sampling(tiny_sd):
    settings = DNGSettings(prior=0.05, p_min=0.01, p_max=0.3)
    guidance = Guidance(rule="dng", positive=Term("a photo of a cat"), negatives=(Term("glasses"),), settings=settings)
    out = sample(tiny_sd, guidance, make_scheduler("ddim", tiny_sd.scheduler), [0, 1], 8, 32, 32, keep_trace=True)
    posteriors = torch.stack([posterior(guidance.settings, info.guidance_state) for info in out.trace])
    assert ((posteriors >= 0.01) & (posteriors <= 0.3)).all()
    assert posteriors[0].tolist() == pytest.approx([0.05, 0.05])
    assert not torch.equal(posteriors[0], posteriors[-1])  # it moves


def test_apg_momentum_is_carried_across_steps(tiny_sd):
    plain = Guidance(
        rule="apg", positive=Term("a photo of a cat"), negatives=(Term("glasses"),), settings=APGSettings(eta=0.5)
    )
    moving = Guidance(
        rule="apg",
        positive=Term("a photo of a cat"),
        negatives=(Term("glasses"),),
        settings=APGSettings(eta=0.5, momentum=-0.5),
    )
    a = sample(tiny_sd, plain, make_scheduler("ddim", tiny_sd.scheduler), [0], 4, 32, 32).images
    b = sample(tiny_sd, moving, make_scheduler("ddim", tiny_sd.scheduler), [0], 4, 32, 32).images
    assert not (a == b).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Guidance(rescale=-0.1), "rescale φ must be in"),
        (lambda: Guidance(rescale=math.nan), "finite"),
        (lambda: DNGSettings(p_max=1.0).validate(), "p_max < 1"),
        (lambda: DNGSettings(p_min=0.5, p_max=0.4).validate(), "p_min < p_max"),
        (lambda: DNGSettings(prior=0.9).validate(), "must lie in"),
        (lambda: DNGSettings(strength=-1).validate(), "≥ 0"),
        (lambda: APGSettings(norm_threshold=-1).validate(), "≥ 0"),
        (lambda: APGSettings(momentum=1.0).validate(), "(−1, 1)"),
        (lambda: Guidance(rule="perp-neg"), "needs a negative"),
        (lambda: Guidance(rule="dng", negatives=(Term("a"), Term("b"))), "one negative"),
    ],
)
def test_out_of_range_settings(make, message):
    with pytest.raises(NegpromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_json_round_trip_with_modifiers():
    guidance = Guidance(
        rule="dng",
        positive=Term("a"),
        negatives=(Term("b"),),
        rescale=0.7,
        interval=Window(0.1, 0.9),
        settings=DNGSettings(strength=3.0, p_max=0.5),
    )
    assert Guidance.from_json(guidance.to_json()) == guidance
