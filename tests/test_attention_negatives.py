"""NAG and VSF: negatives inside cross-attention, as rules (processors installed for the run, handed each call's
negative, and restored)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.guidance import formulas
from negprompt.guidance.attention_processors import NegativeAttentionProcessor, nag_combine, vsf_combine
from negprompt.guidance.rules import rule_named
from negprompt.guidance.rules.base import GuidanceError
from negprompt.interfaces.cli import main
from negprompt.layers.attention import attention_paths
from negprompt.layers.layout import AttentionLayout
from negprompt.sampling.loop import SamplingError
from negprompt.session import Session

PROMPT, NEGATIVE = "a photo of a cat", "glasses"
OPTIONS = dict(steps=4, scheduler="ddim", seeds=[1, 2], size=32)


def processor_kinds(unet) -> set[str]:
    return {type(p).__name__ for p in unet.attn_processors.values()}


def nag_acting(unet) -> bool:
    """Whether a NAG processor holds a call's negative (installed for the run, it passes through otherwise)."""
    processors = unet.attn_processors.values()
    return any(getattr(getattr(p, "slot", None), "current", None) is not None for p in processors)


def test_processors_are_installed_for_the_run_and_restored_also_after_an_error(tiny_sd):
    session = Session(tiny_sd)
    before = dict(tiny_sd.unet.attn_processors)
    seen = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: seen.append(processor_kinds(module)))
    try:
        session.run(session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, **OPTIONS))
    finally:
        handle.remove()
    assert all("NegativeAttentionProcessor" in kinds for kinds in seen) and len(seen) == 4
    assert tiny_sd.unet.attn_processors == before

    def fail(info):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        session.run(session.spec(PROMPT, NEGATIVE, rule="vsf", scale=1, **OPTIONS), callback=fail)
    assert tiny_sd.unet.attn_processors == before


@pytest.mark.parametrize("rule, settings", [("nag", {"phi": 1.0}), ("nag", {"alpha": 0.0}), ("vsf", {"scale": 0.0})])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_neutral_settings_give_the_plain_run_bit_for_bit(tiny_sd, rule, settings, scale):
    session = Session(tiny_sd)
    plain = session.run(session.spec(PROMPT, rule="cfg", scale=scale, **OPTIONS))
    neutral = session.run(session.spec(PROMPT, NEGATIVE, rule=rule, scale=scale, rule_settings=settings, **OPTIONS))
    assert np.array_equal(plain.pixels, neutral.pixels)
    assert neutral.unet_batch_rows == plain.unet_batch_rows == (1 if scale == 1 else 2) * 4 * 2


def test_scale_one_is_one_pass_and_the_negative_acts(tiny_sd):
    session = Session(tiny_sd)
    plain = session.run(session.spec(PROMPT, rule="cfg", scale=1, **OPTIONS))
    sd = session.run(session.spec(PROMPT, NEGATIVE, rule="sd", scale=1, **OPTIONS))
    for rule in ("nag", "vsf"):
        run = session.run(session.spec(PROMPT, NEGATIVE, rule=rule, scale=1, **OPTIONS))
        assert run.unet_batch_rows == 4 * 2  # one row per image and step
        assert np.abs(run.pixels - plain.pixels).max() > 1e-2  # the negative changes the image
    assert np.array_equal(sd.pixels, plain.pixels)  # rule (9) at s = 1: ε̂ = ε_y, the negative cannot act
    assert sd.unet_batch_rows == plain.unet_batch_rows == 4 * 2  # and is not evaluated


def attention_layer(tiny_sd):
    path = attention_paths(tiny_sd.unet, "cross")[0]
    attn = tiny_sd.unet.get_submodule(path)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    positive = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    negative = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    return attn, hidden, positive, negative


def direct_attention(attn, hidden, context, extra_keys=None, extra_values=None, bias=0.0):
    """softmax(q kᵀ/√d) v per head, written out in float64 (keys/values may be extended)."""
    q, k, v = attn.to_q(hidden).double(), attn.to_k(context).double(), attn.to_v(context).double()
    heads, d = attn.heads, q.shape[-1] // attn.heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if extra_keys is not None:
        logits = torch.cat([logits, q @ extra_keys.transpose(-1, -2) / math.sqrt(d) + bias], dim=-1)
        v = torch.cat([v, extra_values], dim=2)
    z = logits.softmax(dim=-1) @ v
    return z.permute(0, 2, 1, 3).reshape(hidden.shape[0], hidden.shape[1], heads * d)


def output_layer(attn, z):
    return attn.to_out[0](z.float()) / attn.rescale_output_factor


def test_nag_attention_output_equals_the_formula_written_out(tiny_sd):
    attn, hidden, positive, negative = attention_layer(tiny_sd)
    phi, tau, alpha = 4.0, 5.0, 0.3  # ratios here run 4.2–6.5: τ = 5 clips about half the tokens
    processor = NegativeAttentionProcessor(None, slice(0, 2), negative, nag_combine(phi, tau, alpha))
    ours = processor(attn, hidden, positive)
    z_pos, z_neg = direct_attention(attn, hidden, positive), direct_attention(attn, hidden, negative)
    extrapolated = phi * z_pos - (phi - 1) * z_neg
    ratio = extrapolated.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)
    assert (ratio > tau).any() and (ratio < tau).any()  # both sides of the clip are exercised
    clipped = torch.where(ratio > tau, extrapolated * tau / ratio, extrapolated)
    expected = output_layer(attn, alpha * clipped + (1 - alpha) * z_pos)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_vsf_attention_output_equals_the_formula_written_out(tiny_sd):
    attn, hidden, positive, negative = attention_layer(tiny_sd)
    scale, offset = 3.0, 0.5
    processor = NegativeAttentionProcessor(None, slice(0, 2), negative, vsf_combine(scale, offset, start_tokens=1))
    ours = processor(attn, hidden, positive)
    heads, d = attn.heads, attn.to_k.out_features // attn.heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    k_neg, v_neg = split(attn.to_k(negative[:, 1:]).double()), split(attn.to_v(negative[:, 1:]).double())
    expected = output_layer(attn, direct_attention(attn, hidden, positive, k_neg, -scale * v_neg, offset))
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_nag_formula_is_the_identity_at_phi_one():
    z_pos, z_neg = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(formulas.nag(z_pos, z_neg, 1.0, 2.5, 0.5), z_pos)


def test_the_window_switches_nag_on_at_its_step(tiny_sd):
    session = Session(tiny_sd)
    seen = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: seen.append(nag_acting(module)))
    try:
        delayed = session.run(
            session.spec(PROMPT, NEGATIVE, rule="nag", scale=1, negative_windows=["2:"], **OPTIONS), trace=True
        )
    finally:
        handle.remove()
    assert seen == [False, False, True, True]
    plain = session.run(session.spec(PROMPT, rule="cfg", scale=1, **OPTIONS), trace=True)
    for step in (0, 1):  # before the window: the plain run's predictions exactly
        assert torch.equal(delayed.trace[step].guided, plain.trace[step].guided)
    assert not torch.equal(delayed.trace[2].guided, plain.trace[2].guided)


def test_nag_with_cfg_and_on_sdxl(tiny_sd, tiny_sdxl):
    session = Session(tiny_sd)
    cfg = session.run(session.spec(PROMPT, rule="cfg", scale=5, **OPTIONS))
    nag = session.run(session.spec(PROMPT, NEGATIVE, rule="nag", scale=5, **OPTIONS))
    assert nag.unet_batch_rows == cfg.unet_batch_rows and np.abs(nag.pixels - cfg.pixels).max() > 1e-2
    xl = Session(tiny_sdxl)
    for rule in ("nag", "vsf"):
        out = xl.run(xl.spec(PROMPT, NEGATIVE, rule=rule, scale=1, steps=3, size=32))
        assert np.isfinite(out.pixels).all()


@pytest.mark.parametrize("rule, scale", [("nag", 1.0), ("vsf", 1.0), ("nag", 5.0)])
def test_capture_records_the_negative_inside_attention_as_its_branch(tiny_sd, rule, scale):
    session = Session(tiny_sd)
    spec = session.spec(PROMPT, NEGATIVE, rule=rule, scale=scale, negative_windows=["2:"], **OPTIONS)
    plain = session.run(spec).pixels
    request = CaptureRequest(words={"positive": ["cat"], "negative": ["glasses"]})
    result = capture(spec, request, session, reducer=reduce_layer)
    assert np.array_equal(result.generation.pixels, plain)  # capture changes nothing
    assert result.tensors["present.negative"].tolist() == [False, False, True, True]  # the negative's window
    assert result.tensors["present.positive"].all()
    maps = result.maps("negative", "glasses")[2:]
    assert torch.isfinite(maps).all() and maps.sum() > 0


def test_refusals_rows_per_call_and_a_model_without_attention_on_text(tiny_sd):
    session = Session(tiny_sd)
    spec = session.spec(PROMPT, NEGATIVE, rule="nag", **OPTIONS)
    from dataclasses import replace

    with pytest.raises(SamplingError, match="cannot split"):
        session.run(replace(spec, rows_per_call=2))
    with pytest.raises(GuidanceError, match="has none"):
        rule_named("nag").check_attention(AttentionLayout("none"))
    rule_named("nag").check_attention(tiny_sd.attention_layout)  # the tiny SD's UNet has cross-attention


def test_cli_records_nag_and_refuses_bad_parameters(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "nag.png"
    base = ["generate", "a red circle", "-n", "a hat", "--steps", "4", "-q"]
    assert main([*base, "--rule", "nag", "--scale", "1", "--nag-scale", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    info = Image.open(out).text["parameters"]
    assert "Rule: nag" in info and "nag_phi: 3.0" in info
    bad = tmp_path / "bad.png"
    for flags, message in (
        (["--rule", "nag", "--nag-tau", "1"], "nag_tau"),
        (["--rule", "nag", "--nag-alpha", "1.5"], "nag_alpha"),
        (["--rule", "nag", "--nag-scale", "-1"], "nag_phi"),
        (["--rule", "vsf", "--vsf-scale", "-2"], "vsf_scale"),
        (["--rule", "nag", "--negative-window", "9:"], "window"),
    ):
        assert_usage_error(main([*base, *flags, "--out", str(bad)]), capsys, message, bad)


def test_a_capture_of_one_group_records_only_its_own_negative(tiny_sd):
    """Two NAG groups in one run: the capture of the first records the negative read in its calls only,
    as when it runs alone (the second group's calls read another negative at the same steps)."""
    from negprompt.attention.capture import capture_attention
    from negprompt.attention.result import plan_for

    session = Session(tiny_sd)
    first = session.spec(PROMPT, "red glasses", rule="nag", **OPTIONS)
    second = session.spec("a dog on a beach", "blue glasses", rule="nag", **OPTIONS)
    request = CaptureRequest(words={"negative": ["glasses"]})
    alone = capture(first, request, session, reducer=reduce_layer).tensors["maps.negative"]
    other = capture(second, request, session, reducer=reduce_layer).tensors["maps.negative"]
    assert not torch.equal(alone, other)  # the two groups' negatives give other maps
    with session.exclusive() as components:
        with capture_attention(components.denoiser, plan_for(first, request, session), reduce_layer, 0) as recorder:
            session.run_together([first, second], unet_hooks=[recorder])
    assert torch.equal(recorder.tensors["maps.negative"], alone)
