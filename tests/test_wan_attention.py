"""Wan's text attention (``negprompt.layers.wan_attention``): what capture records of ``attn2`` equals the softmax
of the layer's own queries and keys, NAG and VSF at CFG 1 equal their formulas on one layer and change the output,
and capture splits the video tokens into latent frames (maps per frame, r_t over steps and frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture
from negprompt.guidance.attention_processors import nag_combine, vsf_combine
from negprompt.layers.wan_attention import WanAttentionReader, negative_in_wan_attention

FRAMES, SIDE, TEXT, NEGATIVE_TEXT, TEXT_DIM = 3, 8, 7, 7, 16  # latent (C, F′, h, w) = (4, 3, 8, 8): 3 × 4 × 4 tokens


@pytest.fixture(scope="module")
def transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    with torch.no_grad():  # random weights of a readable size: the default init leaves the text's effect tiny
        for name, parameter in model.named_parameters():
            if "attn2" in name and name.endswith("weight") and parameter.ndim == 2:
                parameter.normal_(0, 0.5)
    return model.eval()


def _inputs(batch=2, seed=3):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, FRAMES, SIDE, SIDE, generator=generator)
    text = torch.randn(batch, TEXT, TEXT_DIM, generator=generator)
    negative = torch.randn(batch, NEGATIVE_TEXT, TEXT_DIM, generator=generator)
    return latents, text, negative


def _call(transformer, latents, text):
    with torch.no_grad():
        return transformer(latents, torch.tensor([700.0] * latents.shape[0]), text, return_dict=False)[0]


def _kept_inputs(transformer, path):
    """A forward pre-hook keeping the first call's (hidden_states, encoder_hidden_states) of the layer ``path``."""
    seen = {}

    def keep(module, args):
        seen.setdefault("hidden", args[0].clone())
        seen.setdefault("text", args[1].clone())

    return seen, transformer.get_submodule(path).register_forward_pre_hook(keep)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2).double()


def _direct_zs(attn, hidden, text, negative):
    """Direct (float64): Z⁺ and Z⁻ (B, N, H·d) of one attn2 layer, as diffusers' WanAttnProcessor computes them."""
    q = _heads(attn.norm_q(attn.to_q(hidden)), attn.heads)
    outs = []
    for context in (text, negative):
        k = _heads(attn.norm_k(attn.to_k(context)), attn.heads)
        v = _heads(attn.to_v(context), attn.heads)
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        outs.append((weights @ v).transpose(1, 2).flatten(2))
    return q, outs


def _nag(positive, negative, phi, tau, alpha):
    """Direct: NAG (Chen et al. 2025 §3) per token, L1 ratio clipped at τ, blended with α."""
    extrapolated = phi * positive - (phi - 1) * negative
    ratio = extrapolated.abs().sum(-1, keepdim=True) / positive.abs().sum(-1, keepdim=True)
    return alpha * extrapolated * ratio.clamp(max=tau) / ratio + (1 - alpha) * positive


def _guided_layer(transformer, combine, path="blocks.1.attn2"):
    """(guided output, plain output of the whole model, the layer's inputs and output under the rule, negative)."""
    latents, text, negative = _inputs()
    seen, hook = _kept_inputs(transformer, path)
    outputs = {}
    out_hook = transformer.get_submodule(path).register_forward_hook(lambda m, a, o: outputs.setdefault("out", o))
    try:
        with negative_in_wan_attention(transformer, slice(0, 2), {"encoder_hidden_states": negative}, combine):
            guided = _call(transformer, latents, text)
    finally:
        hook.remove()
        out_hook.remove()
    return guided, _call(transformer, latents, text), seen, outputs["out"], negative


def test_paths_are_the_cross_attention_layers(transformer):
    assert WanAttentionReader().paths(transformer) == ["blocks.0.attn2", "blocks.1.attn2"]


def test_nag_output_of_a_layer_equals_the_formula_and_changes_the_output(transformer):
    phi, tau, alpha = 4.0, 2.5, 0.5
    guided, plain, seen, layer_out, negative = _guided_layer(transformer, nag_combine(phi, tau, alpha))
    assert (guided - plain).abs().max() > 1e-3  # NAG is not a no-op
    attn = transformer.get_submodule("blocks.1.attn2")
    with torch.no_grad():
        projected = transformer.condition_embedder.text_embedder(negative)
        _, (z_pos, z_neg) = _direct_zs(attn, seen["hidden"], seen["text"], projected)
        expected = attn.to_out[0](_nag(z_pos, z_neg, phi, tau, alpha).float())
    assert (layer_out - expected).abs().max() <= 1e-5
    with torch.no_grad():  # and φ = 1 gives the layer's own output
        same, plain_again, *_ = _guided_layer(transformer, nag_combine(1.0, tau, alpha))
    assert (same - plain_again).abs().max() <= 1e-5


def test_vsf_output_of_a_layer_equals_the_formula(transformer):
    scale, offset = 0.8, -0.1
    guided, plain, seen, layer_out, negative = _guided_layer(transformer, vsf_combine(scale, offset, 0))
    assert (guided - plain).abs().max() > 1e-3
    attn = transformer.get_submodule("blocks.1.attn2")
    with torch.no_grad():
        projected = transformer.condition_embedder.text_embedder(negative)
        q = _heads(attn.norm_q(attn.to_q(seen["hidden"])), attn.heads)
        k = _heads(attn.norm_k(attn.to_k(torch.cat([seen["text"], projected], 1))), attn.heads)
        v = _heads(attn.to_v(torch.cat([seen["text"], projected], 1)), attn.heads)
        v[:, :, TEXT:] *= -scale  # Value Sign Flip: the negative's values flipped and scaled
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        scores[..., TEXT:] += offset
        z = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        expected = attn.to_out[0](z.float())
    assert (layer_out - expected).abs().max() <= 1e-5


def test_processors_are_restored_after_an_error(transformer):
    before = dict(transformer.attn_processors)
    latents, text, negative = _inputs()

    def failing(*args, **kwargs):
        raise RuntimeError("the rule failed")

    with pytest.raises(RuntimeError, match="the rule failed"):
        with negative_in_wan_attention(transformer, slice(0, 2), {"encoder_hidden_states": negative}, failing):
            _call(transformer, latents, text)
    assert dict(transformer.attn_processors) == before


class _Recorder:
    """A recorder keeping what it is given (the AttentionReader protocol's Recorder)."""

    active, text_length = True, TEXT + 2

    def __init__(self):
        self.records = []

    def record(self, path, probabilities, heads):
        self.records.append((path, probabilities, heads))

    def wants_context(self, branch):
        return False

    def record_context(self, path, branch, probabilities, heads):
        raise AssertionError("no context is wanted")


def test_captured_probabilities_equal_the_softmax_and_keep_the_output(transformer):
    from negprompt.layers.processors import installed

    reader, recorder = WanAttentionReader(), _Recorder()
    latents, text, _ = _inputs()
    paths = reader.paths(transformer)
    seen, hook = _kept_inputs(transformer, paths[0])
    try:
        with installed(transformer, lambda p, o: reader.capture_processor(p, o, recorder) if p in paths else None):
            captured = _call(transformer, latents, text)
    finally:
        hook.remove()
    assert torch.equal(captured, _call(transformer, latents, text))  # capture keeps the output bit-identical
    assert [r[0] for r in recorder.records] == paths
    path, probabilities, heads = recorder.records[0]
    tokens = FRAMES * (SIDE // 2) ** 2
    assert heads == 2 and probabilities.shape == (2 * 2, tokens, TEXT + 2)
    attn = transformer.get_submodule(path)
    with torch.no_grad():
        q = _heads(attn.norm_q(attn.to_q(seen["hidden"])), 2)
        k = _heads(attn.norm_k(attn.to_k(seen["text"])), 2)
        direct = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).flatten(0, 1)
    assert (probabilities[..., :TEXT].double() - direct).abs().max() <= 1e-6
    assert probabilities[..., TEXT:].abs().max() == 0  # keys the layer has not: zeros


# ---------------------------------------------------------------- end to end on the tiny Wan (negprompt.models.wan)

PROMPT, NEGATIVE = "a cat on a mat", "a hat"
VIDEO = dict(steps=2, size=32, frames=5, seeds=[1, 2])  # 32² px, 5 frames: latents (16, 2, 4, 4), 2 × 2 × 2 tokens


@pytest.fixture(scope="module")
def wan():
    from negprompt.testing.tiny_wan import build_tiny_wan

    return build_tiny_wan()


@pytest.fixture(scope="module")
def wan_session(wan):
    from negprompt.session import Session

    return Session(wan)


def _latent_frames(components, spec):
    return components.family.latent_shape(components, spec.height, spec.width, spec.frames)[1]


def test_nag_and_vsf_at_scale_1_change_the_frames_in_one_pass_and_neutral_settings_are_plain(wan_session):
    session = wan_session
    options = {**VIDEO, "seeds": [1], "scale": 1.0}
    plain = session.run(session.spec(PROMPT, **options, rule="cfg"))
    for neutral in ({"phi": 1.0}, {"alpha": 0.0}):
        same = session.run(session.spec(PROMPT, NEGATIVE, **options, rule="nag", rule_settings=neutral))
        assert np.array_equal(same.pixels, plain.pixels)
    # measured: 3·10⁻⁵ at NAG's defaults (the tiny UMT5's 512 keys are mostly the zero states' one key), 9·10⁻²
    # with φ = 20, τ = 100, α = 1; VSF 1·10⁻¹
    for rule, settings, least in (
        ("nag", {}, 1e-6),
        ("nag", {"phi": 20.0, "tau": 100.0, "alpha": 1.0}, 1e-2),
        ("vsf", {}, 1e-2),
    ):
        guided = session.run(session.spec(PROMPT, NEGATIVE, **options, rule=rule, rule_settings=settings))
        assert guided.pixels.shape == plain.pixels.shape == (1, 5, 32, 32, 3)
        assert np.abs(guided.pixels - plain.pixels).max() > least, (rule, settings)
        assert guided.unet_batch_rows == plain.unet_batch_rows == 2  # one pass a step: the negative is read inside


def _keeping(kept):
    def reducer(probabilities, selection, hw, size):
        kept.append(probabilities.clone())
        return reduce_layer(probabilities, selection, hw, size)

    return reducer


def test_capture_gives_maps_per_latent_frame_and_keeps_the_frames(wan, wan_session):
    session = wan_session
    assert wan.attention_layout.frames  # the family describes the frame axis
    spec = session.spec(PROMPT, NEGATIVE, **VIDEO, scale=4.0)
    kept = []
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=_keeping(kept))
    frames, batch, layers = _latent_frames(wan, spec), 2, 2
    side = 32 // wan.latent_factor // 2  # h′ = w′: latent side / patch
    length = sum(segment[2] for segment in wan.family.text_key_segments(wan))  # UMT5's padded tokens (tiny: 32)
    assert frames == 2 and result.frames == frames and result.index["frames"] == frames
    assert np.array_equal(result.generation.pixels, session.run(spec).pixels)  # capture keeps the frames
    # the reducer sees one latent frame at a time: (B, heads, h′·w′, L), softmax over the text keys alone
    assert len(kept) == 2 * layers * 2 * frames  # steps × layers × branches × frames
    for probabilities in kept:
        assert probabilities.shape == (batch, 2, side * side, length)
        assert probabilities.min() >= 0
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(batch, 2, side * side))
    maps = result.maps("positive", "cat")
    assert maps.shape == (2, batch, frames, side, side) and maps.min() >= 0 and maps.amax() > 0
    assert result.energy("negative").shape == (2, layers, batch, frames)
    assert (
        result.frobenius("positive", "cat").shape == result.mass("positive", "cat").shape == (2, layers, batch, frames)
    )
    # step 0, layer 0, the positive: its frames' attention differs (each frame its own h′·w′ tokens)
    assert not torch.equal(kept[0], kept[1])


def test_r_t_over_steps_and_frames(wan, wan_session):
    from negprompt.analysis.strength import strength_curves, strength_over_frames

    session = wan_session
    spec = session.spec(PROMPT, NEGATIVE, **{**VIDEO, "steps": 3}, scale=4.0)
    result = capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)
    frames = _latent_frames(wan, spec)
    per_frame = strength_over_frames(result, "hat", "cat")
    video = strength_curves(result, "hat", "cat")
    for definition in ("article", "released"):
        assert per_frame[definition].shape == (3, 2, frames) and torch.isfinite(per_frame[definition]).all()
        assert video[definition].shape == (3, 2) and torch.isfinite(video[definition]).all()
        assert (per_frame[definition] > 0).all()
    # the video's released r_t is a weighted mean of its frames' (weights: the positive's energy per frame)
    low, high = per_frame["released"].amin(dim=2), per_frame["released"].amax(dim=2)
    assert (video["released"] >= low - 1e-6).all() and (video["released"] <= high + 1e-6).all()
    assert per_frame["related"] == video["related"] == ["cat", "cat"]


def test_timeline_per_frame_and_capture_during_nag_records_the_negative(wan, wan_session):
    from negprompt.attention.figures import timeline

    session = wan_session
    spec = session.spec(PROMPT, NEGATIVE, **{**VIDEO, "seeds": [1]}, scale=1.0, rule="nag")
    request = CaptureRequest({"positive": ["cat"], "negative": ["hat"]})
    result = capture(spec, request, session, reducer=reduce_layer)
    assert result.present("negative").all()  # read inside the positive's pass, every step
    assert torch.isfinite(result.energy("negative")).all() and result.maps("negative", "hat").amax() > 0
    figure = timeline(result, wan, frame=1)
    assert figure.size[1] > 0 and len(np.unique(np.asarray(figure).reshape(-1, 3), axis=0)) > 10
    with pytest.raises(ValueError, match="give a frame in 0–1"):
        timeline(result, wan)


def test_capture_records_the_steps_of_both_experts():
    from negprompt.session import Session
    from negprompt.testing.tiny_wan import build_tiny_wan

    two = build_tiny_wan(two_experts=True, boundary_ratio=0.7)
    session = Session(two)
    spec = session.spec(PROMPT, NEGATIVE, **{**VIDEO, "steps": 4}, scale=4.0)
    experts = [two.family.expert_at(two, t) for t in _timesteps(two, spec)]
    assert experts[0] == 0 and experts[-1] == 1  # both experts predict
    result = capture(spec, CaptureRequest({"positive": ["cat"]}), session, reducer=reduce_layer)
    assert torch.isfinite(result.energy("positive")).all()  # every step recorded, on either expert
    assert np.array_equal(result.generation.pixels, session.run(spec).pixels)


def _timesteps(components, spec):
    scheduler = type(components.scheduler).from_config(components.scheduler.config)
    scheduler.set_timesteps(spec.steps)
    return list(scheduler.timesteps)


# ---------------------------------------------------------------- the study


def test_a_study_pair_on_the_tiny_wan_gives_finite_rows_per_step_and_seed(wan_session):
    from dataclasses import replace

    from negprompt.analysis.spec import load_spec
    from negprompt.analysis.study import DEFINITIONS, run_pair

    spec = replace(load_spec("ban2024-wan"), steps=2, size=32, map_size=None, seeds=(1, 2))
    pair = replace(spec.pairs[0], prompt="a cat on a mat", negative="a hat", word="hat")
    rows, calls = run_pair(spec, 0, pair, wan_session)
    assert len(rows) == 2 * 2 * len(DEFINITIONS) and calls > 0  # seeds × steps × definitions
    assert all(np.isfinite(float(row[-1])) and float(row[-1]) > 0 for row in rows)


def test_the_built_in_study_spec_parses_and_needs_the_model_in_the_cache(tmp_path, capsys, monkeypatch):
    from helpers import assert_usage_error

    from negprompt.analysis.spec import load_spec
    from negprompt.interfaces.cli import main

    spec = load_spec("ban2024-wan")
    assert (spec.model, spec.steps, spec.scale, spec.size, spec.map_size, spec.rule) == (
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        50,
        5.0,
        480,
        30,
        "sd",
    )
    assert len(spec.pairs) == 20 and len(spec.seeds) == 10
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "study"
    code = main(["study", "ban2024-wan", "--out", str(out), "-q"])
    message = "model id 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers' is not in the local Hugging Face cache"
    assert_usage_error(code, capsys, message, out)


def test_bench_wan_tiny_run_writes_its_ratios(monkeypatch, tmp_path):
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_wan

    out = tmp_path / "wan.json"
    argv = ["bench_wan.py", "--size", "32", "--frames", "5", "--steps", "2", "--batch", "1", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    bench_wan.main()
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == set(result["targets"]) and all(v > 0 for v in result["ratios"].values())
    assert result["median_seconds"]["diffusers"] > 0
