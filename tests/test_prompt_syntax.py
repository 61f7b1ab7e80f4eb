"""AUTOMATIC1111 prompt syntax: parser properties, weights, prompt editing mapped onto windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from negprompt.errors import NegpromptError
from negprompt.guidance import syntax
from negprompt.guidance.plan import Guidance, Term
from negprompt.guidance.windows import Window
from negprompt.models.prompts import encode_prompts
from negprompt.sampling.loop import sample
from negprompt.sampling.schedulers import make_scheduler

ALPHABET = st.sampled_from(list("ab :()[]\\.,0123") + ["hat", "0.5", "1.3", "::", "\\("])


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, max_size=14).map("".join))
def test_any_string_parses_or_fails_with_a_clear_error(text):
    try:
        tree = syntax.parse(text)
    except syntax.PromptSyntaxError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert syntax.parse(syntax.render(tree)) == tree  # round trip
    syntax.resolve(tree, 3, 10)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_arbitrary_unicode_never_crashes(text):
    try:
        syntax.parse(text)
    except syntax.PromptSyntaxError:
        pass


WORDS = st.text(alphabet="abc xyz", min_size=1, max_size=6)


@st.composite
def trees(draw, depth=0):
    nodes = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["text", "weight", "edit"] if depth < 2 else ["text"]))
        if kind == "text":
            nodes.append(syntax.Text(draw(WORDS)))
        elif kind == "weight":
            w = draw(st.sampled_from([0.5, 1.3, 2.0]))
            nodes.append(syntax.Weighted(draw(trees(depth=depth + 1)), w, explicit=True))
        else:
            nodes.append(
                syntax.Edit(
                    draw(trees(depth=depth + 1)),
                    draw(trees(depth=depth + 1)),
                    draw(st.sampled_from([0.25, 3.0, 7.0])),
                    "replace",
                )
            )
    merged = []
    for node in nodes:  # adjacent texts merge when parsed
        if merged and isinstance(node, syntax.Text) and isinstance(merged[-1], syntax.Text):
            merged[-1] = syntax.Text(merged[-1].text + node.text)
        else:
            merged.append(node)
    return tuple(merged)


@settings(max_examples=200, deadline=None)
@given(trees())
def test_render_then_parse_is_the_identity(tree):
    assert syntax.parse(syntax.render(tree)) == tree


@pytest.mark.parametrize(
    "text, message",
    [
        ("a (red hat", "unbalanced '('"),
        ("a red) hat", "unbalanced ')'"),
        ("[hat:5", "unbalanced '['"),
        ("(hat:x)", "not a number"),
        ("[a:b:c]", "not a number"),
        ("a ] b", "unbalanced ']'"),
    ],
)
def test_clear_errors(text, message):
    with pytest.raises(NegpromptError) as error:
        syntax.parse(text)
    assert message in str(error.value)


def test_weights_and_edits_resolve():
    tree = syntax.parse("a (red:1.5) ((hat)) [small] [cat:dog:0.5] [sun:3] [moon::3]")
    before = dict((t.strip(), w) for t, w in syntax.resolve(tree, 2, 10) if t.strip())
    assert before["red"] == 1.5 and before["hat"] == pytest.approx(1.21) and before["small"] == pytest.approx(1 / 1.1)
    assert syntax.plain_text(syntax.text_at("[cat:dog:0.5] [sun:3] [moon::3]", 2, 10)).split() == ["cat", "moon"]
    assert syntax.plain_text(syntax.text_at("[cat:dog:0.5] [sun:3] [moon::3]", 5, 10)).split() == ["dog", "sun"]


def test_weight_one_encodes_exactly_like_the_plain_prompt(tiny_sd):
    plain = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["a photo of a cat"])
    weighted = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["(a photo of a cat:1.0)"])
    assert torch.equal(plain, weighted)
    heavier = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["a photo of a (cat:1.5)"])
    assert not torch.allclose(plain, heavier)


def test_weighted_prompts_stay_finite_when_the_weighted_mean_is_near_zero(tiny_sd):
    from negprompt.api import generate

    # On this random-weight model, rescaling to the unweighted mean divided by ≈ 0 (images were NaN).
    hidden = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, ["((glasses))", "a (photo:1.3) of a cat"])
    assert torch.isfinite(hidden).all()
    pixels = generate("a (photo:1.3) of a cat", negative="((glasses))", model=tiny_sd, steps=2, seeds=[0]).pixels
    assert np.isfinite(pixels).all()


def test_delayed_negative_syntax_equals_a_window_bit_exactly(tiny_sd):
    def images(guidance):
        return sample(tiny_sd, guidance, make_scheduler("ddim", tiny_sd.scheduler), [4], 6, 32, 32).images

    syntax_version = Guidance(positive=Term("a photo of a cat"), negatives=(Term("[glasses:3]"),))
    window_version = Guidance(positive=Term("a photo of a cat"), negatives=(Term("glasses", window=Window(3)),))
    early_syntax = Guidance(positive=Term("a photo of a cat"), negatives=(Term("[glasses::2]"),))
    early_window = Guidance(positive=Term("a photo of a cat"), negatives=(Term("glasses", window=Window(0, 2)),))
    assert syntax_version.branches_at(0, 6) == ["unconditional", "positive"]
    assert np.array_equal(images(syntax_version), images(window_version))
    assert np.array_equal(images(early_syntax), images(early_window))


def test_edit_step_outside_the_schedule(tiny_sd):
    from negprompt.session import Session

    with pytest.raises(NegpromptError, match="switches at step 40, outside the schedule"):
        Session(tiny_sd).spec("a photo of a cat", "[glasses:40]", scheduler="ddim", steps=6, size=32)
