"""Cross-attention capture: probabilities, identical images, restoration, words→tokens, memory, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_usage_error, shapes_components

from negprompt.analysis.attention_stats import (
    attention_mass,
    centroid,
    frobenius_norm,
    reduce_layer,
    spread,
    summarize,
    word_maps,
)
from negprompt.api import run
from negprompt.attention.capture import (
    CaptureProcessor,
    CaptureRequest,
    capture_attention,
    cross_attention_layers,
)
from negprompt.attention.result import AttentionCapture, capture, plan_for
from negprompt.attention.tokens import tokenize_words
from negprompt.errors import NegpromptError
from negprompt.interfaces.cli import main
from negprompt.layers.attention import cross_attention_probabilities
from negprompt.sampling.loop import RowBlock
from negprompt.session import Session

PROMPT, NEGATIVE = "a photo of a woman in the streets", "red glasses"


def settings_for(tiny_sd, **kwargs):
    options = dict(negative=NEGATIVE, steps=5, scheduler="ddim", seeds=[1, 2], size=32, model=tiny_sd)
    options.update(kwargs)
    session = Session(options.pop("model"))
    return session.spec(PROMPT, **options), session.components


def layer_inputs(tiny_sd):
    layer = cross_attention_layers(tiny_sd.unet)[0]
    attn = tiny_sd.unet.get_submodule(layer.path)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 256, attn.to_q.in_features, generator=g)  # 16×16 latent at 32 px
    context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    return layer, attn, hidden, context


def test_probability_rows_sum_to_one(tiny_sd):
    _, attn, hidden, context = layer_inputs(tiny_sd)
    probs = cross_attention_probabilities(attn, hidden, context)
    assert probs.shape == (2 * attn.heads, 256, 77)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2 * attn.heads, 256))
    assert (probs >= 0).all()


def test_capture_processor_output_equals_the_original_exactly(tiny_sd):
    layer, attn, hidden, context = layer_inputs(tiny_sd)
    settings, components = settings_for(tiny_sd)
    plan = plan_for(settings, CaptureRequest(words={"positive": ["woman"]}), components)
    with capture_attention(tiny_sd.unet, plan, reduce_layer) as recorder:
        original = dict(tiny_sd.unet.attn_processors)[layer.path + ".processor"].original
        recorder.before_unet_call(0, 999.0, [RowBlock(0, "positive", 0, 2)])
        wrapped = CaptureProcessor(original, recorder, layer.path)
        assert torch.equal(wrapped(attn, hidden, context), original(attn, hidden, context))


def test_images_are_bit_identical_with_and_without_capture(tiny_sd):
    settings, components = settings_for(tiny_sd, negative_windows=["2:"])
    plain = run(settings, components).pixels
    captured = capture(
        settings,
        CaptureRequest(words={"positive": ["woman", "streets"], "negative": ["glasses"]}),
        components,
        reducer=reduce_layer,
    )
    assert np.array_equal(plain, captured.generation.pixels)


def test_processors_are_restored_after_an_error(tiny_sd):
    before = dict(tiny_sd.unet.attn_processors)
    settings, components = settings_for(tiny_sd)
    plan = plan_for(settings, CaptureRequest(words={"positive": ["woman"]}), components)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny_sd.unet, plan, reduce_layer):
            assert any(isinstance(p, CaptureProcessor) for p in tiny_sd.unet.attn_processors.values())
            raise RuntimeError("boom")
    after = dict(tiny_sd.unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_words_to_tokens_with_multi_token_words(tiny_sd):
    tokenized = tokenize_words(tiny_sd.tokenizer, "A woman in the Streets, with glasses")
    assert tokenized.words == ("a", "woman", "in", "the", "streets", ",", "with", "glasses")
    assert tokenized.positions_of("woman") == (2,)
    streets = tokenized.positions_of("streets")
    assert len(streets) > 1 and streets == tuple(range(5, 5 + len(streets)))
    assert tokenized.positions_of("<start>") == (0,) and tokenized.positions_of("<end>") == (tokenized.end,)
    with pytest.raises(NegpromptError, match="'cat' is not in the prompt.*'woman'"):
        tokenized.positions_of("cat")


def test_words_to_tokens_with_the_word_level_tokenizer():
    from negprompt.shapes.model import build_tokenizer

    tokenized = tokenize_words(build_tokenizer(), "a red circle with a hat")
    assert tokenized.words == ("a", "red", "circle", "with", "a", "hat")
    assert tokenized.positions_of("hat") == (6,) and tokenized.positions_of("a") == (1, 5)


def test_memory_estimate_matches_what_is_stored(tiny_sd):
    settings, components = settings_for(tiny_sd)
    for request in (
        CaptureRequest(words={"positive": ["woman", "streets"], "negative": ["glasses"]}),
        CaptureRequest(words={"negative": ["red"]}, average_layers=False, steps=[1, 3], size=16),
        CaptureRequest(words={"positive": [], "unconditional": []}, layers=["16"]),
    ):
        plan = plan_for(settings, request, components)
        result = capture(settings, request, components, trace=False, reducer=reduce_layer)
        stored = sum(t.numel() * t.element_size() for t in result.tensors.values())
        assert plan.memory_bytes() == stored == result.index["memory_stored_bytes"]
        assert all(t.dtype == torch.float16 for k, t in result.tensors.items() if k.startswith("maps."))


def test_per_layer_maps_agree_with_their_statistics(tiny_sd):
    """At the layer's own resolution the stored map sums to its mass and has its Frobenius norm."""
    settings, components = settings_for(tiny_sd)
    request = CaptureRequest(words={"positive": ["woman"]}, layers=["16"], average_layers=False, size=16)
    result = capture(settings, request, components, trace=False, reducer=reduce_layer)
    maps = result.tensors["maps.positive"][..., 0, :, :].float()  # (steps, layers, B, S, S)
    torch.testing.assert_close(maps.sum(dim=(-1, -2)), result.mass("positive", "woman"), rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(
        maps.flatten(-2).norm(dim=-1), result.frobenius("positive", "woman"), rtol=2e-3, atol=1e-3
    )


def test_a_custom_reducer_decides_what_is_stored(tiny_sd):
    """The recorder stores what its reducer returns: here only the mass; the rest stays NaN (maps 0)."""

    def mass_only(probabilities, selection, hw, size):
        return {"mass": attention_mass(word_maps(probabilities, selection))}

    settings, components = settings_for(tiny_sd, negative_windows=["2:"])
    request = CaptureRequest(words={"positive": ["woman"], "negative": ["glasses"]})
    full = capture(settings, request, components, trace=False, reducer=reduce_layer)
    only = capture(settings, request, components, trace=False, reducer=mass_only)
    assert only.tensors.keys() == full.tensors.keys()
    assert all(only.tensors[k].shape == full.tensors[k].shape for k in full.tensors)
    for branch in ("positive", "negative"):
        assert torch.equal(only.present(branch), full.present(branch))
        assert torch.isnan(only.energy(branch)).all()
        assert not only.tensors[f"maps.{branch}"].any()
    assert torch.isnan(only.frobenius("positive", "woman")).all()
    assert torch.equal(only.mass("positive", "woman"), full.mass("positive", "woman"))
    mass = only.mass("negative", "glasses")
    assert torch.isnan(mass[:2]).all() and torch.equal(mass[2:], full.mass("negative", "glasses")[2:])
    assert np.array_equal(only.generation.pixels, full.generation.pixels)


@pytest.mark.parametrize(
    "returned, message",
    [({"entropy": torch.zeros(2)}, "returned 'entropy'"), ({"energy": torch.zeros(3)}, r"is \(3,\), expected \(2,\)")],
)
def test_a_reducer_returning_what_cannot_be_stored_is_refused(tiny_sd, returned, message):
    settings, components = settings_for(tiny_sd)
    request = CaptureRequest(words={"positive": ["woman"]})
    with pytest.raises(NegpromptError, match=message):
        capture(settings, request, components, trace=False, reducer=lambda *args: returned)
    assert not any(isinstance(p, CaptureProcessor) for p in tiny_sd.unet.attn_processors.values())


def test_statistics_of_a_single_pixel_map():
    m = torch.zeros(4, 4)
    m[1, 3] = 2.0
    assert centroid(m) == (0.875, 0.375) and spread(m, centroid(m)) == 0.0
    assert all(math.isnan(v) for v in (*centroid(torch.zeros(4, 4)), spread(torch.zeros(4, 4), (0.5, 0.5))))
    maps = m.reshape(1, 1, 4, 4)
    assert frobenius_norm(maps).item() == 2.0 and attention_mass(maps.flatten(2)).item() == 2.0


def test_delayed_negative_is_absent_before_its_window(tiny_sd):
    settings, components = settings_for(tiny_sd, negative_windows=["2:"])
    request = CaptureRequest(words={"negative": ["glasses"]})
    result = capture(settings, request, components, trace=False, reducer=reduce_layer)
    assert result.present("negative").tolist() == [False, False, True, True, True]
    assert torch.isnan(result.frobenius("negative", "glasses")[:2]).all()
    assert not torch.isnan(result.frobenius("negative", "glasses")[2:]).any()


def test_save_and_load_round_trip(tiny_sd, tmp_path):
    settings, components = settings_for(tiny_sd)
    request = CaptureRequest(words={"positive": ["woman"]})
    result = capture(settings, request, components, trace=False, reducer=reduce_layer)
    result.save(tmp_path)
    loaded = AttentionCapture.load(tmp_path)
    assert loaded.index == json.loads(json.dumps(result.index))
    assert all(torch.equal(loaded.tensors[k], v) for k, v in result.tensors.items())
    rows = summarize(loaded)
    assert {r["word"] for r in rows} == {"woman"} and len(rows) == 5 * 2
    assert all(0 <= r["centroid_x"] <= 1 and r["spread"] > 0 for r in rows)


def test_capture_on_the_shapes_model_architecture(tmp_path):
    """The bundled model's architecture (word-level tokenizer, pixel space, no VAE)."""
    torch.manual_seed(0)
    components = shapes_components()
    settings = Session(components).spec("a red circle", negative="a hat", steps=4, scheduler="ddim")
    request = CaptureRequest(words={"positive": ["red", "circle"], "negative": ["hat"]})
    result = capture(settings, request, components, reducer=reduce_layer)
    sides = sorted({layer["side"] for layer in result.index["layers"]})
    assert len(sides) >= 2 and result.index["size"] == max(sides)
    assert result.maps("negative", "hat").shape == (4, 1, max(sides), max(sides))


ATTEND_BAD = [
    (["--words", "cat"], "'cat' is not in the prompt"),
    (["--layers", "down_blocks.7"], "no cross-attention layer matches"),
    (["--capture-steps", "0-50"], "outside the schedule"),
    (["--memory-limit", "0.001"], "over the limit"),
]


@pytest.mark.parametrize("extra, message", ATTEND_BAD, ids=[m for _, m in ATTEND_BAD])
def test_attend_bad_input(tiny_sd_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "attend"
    argv = [
        "attend",
        PROMPT,
        "--negative",
        NEGATIVE,
        "--model",
        str(tiny_sd_dir),
        "--steps",
        "4",
        "-q",
        "--out",
        str(out),
    ]
    assert_usage_error(main(argv + extra), capsys, message, out)


def test_attend_writes_image_timeline_maps_and_summary(tiny_sd_dir, tmp_path):
    out = tmp_path / "attend"
    argv = ["attend", PROMPT, "--negative", NEGATIVE, "--negative-window", "2:", "--model", str(tiny_sd_dir)]
    assert main(argv + ["--steps", "4", "--words", "woman,streets", "-q", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "image.png",
        "maps.json",
        "maps.safetensors",
        "summary.json",
        "timeline.png",
    ]
    index = json.loads((out / "maps.json").read_text())
    assert index["words"] == {"positive": ["woman", "streets"], "negative": ["red", "glasses"]}


def test_an_empty_step_selection_names_the_schedule(tiny_sd):
    settings, components = settings_for(tiny_sd)
    with pytest.raises(NegpromptError, match="no steps chosen; give step indices in 0–4"):
        plan_for(settings, CaptureRequest(words={"positive": ["woman"]}, steps=[]), components)
