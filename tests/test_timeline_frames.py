"""The timeline's backgrounds (``negprompt.attention.figures``): a video's VAE decodes causally, so one latent frame's
figure needs only latent frames 0…f decoded and shows the same pixels; a shared ``decoded`` dict decodes each step
once, whole, for every frame's figure; given rows are shown as given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import negprompt.attention.figures as figures
from negprompt.analysis.attention_stats import reduce_layer
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture

PROMPT, NEGATIVE = "a cat on a mat", "a hat"
VIDEO = dict(steps=2, size=32, frames=9, seeds=[1, 2], scale=4.0)  # latents (16, 3, 4, 4): 3 latent frames


@pytest.fixture(scope="module")
def wan():
    from negprompt.testing.tiny_wan import build_tiny_wan

    return build_tiny_wan()


@pytest.fixture(scope="module")
def wan_capture(wan):
    from negprompt.session import Session

    session = Session(wan)
    spec = session.spec(PROMPT, NEGATIVE, **VIDEO)
    return capture(spec, CaptureRequest({"positive": ["cat"], "negative": ["hat"]}), session, reducer=reduce_layer)


@pytest.fixture
def decodes(monkeypatch):
    """The latent shapes (1, C, F′, h, w) the figures decode, in order."""
    shapes = []
    original = figures.decode
    monkeypatch.setattr(
        figures, "decode", lambda components, latents: shapes.append(latents.shape) or original(components, latents)
    )
    return shapes


def test_wan_vae_decodes_causally(wan):
    """Latent frames 0…f decode to the whole video's first 4f + 1 frames, bit for bit; one latent frame alone does
    not decode to its frames (each frame's decoding reads the earlier ones): why a prefix, never a subset."""
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = wan.family.decode(wan, latents)[0]  # (9, 32, 32, 3)
    assert whole.shape[0] == 9
    for f in range(3):
        prefix = wan.family.decode(wan, latents[:, :, : f + 1])[0]
        assert prefix.shape[0] == 4 * f + 1 and np.array_equal(prefix, whole[: 4 * f + 1])
    alone = wan.family.decode(wan, latents[:, :, 2:3])[0]
    assert np.abs(alone[-1] - whole[8]).max() > 0.01


def test_one_frame_decodes_only_through_its_frame(wan, wan_capture, decodes, monkeypatch):
    """A family declaring a causal decode: frame f's figure decodes latent frames 0…f of each shown step, and its
    pixels equal those of the figure drawn over whole decodes."""
    monkeypatch.setattr(type(wan.family), "decodes_causally", False)
    whole = [np.asarray(figures.timeline(wan_capture, wan, image=1, frame=f)) for f in range(3)]
    assert [shape[2] for shape in decodes] == [3] * 6  # 3 figures × 2 steps, every latent frame
    decodes.clear()
    monkeypatch.setattr(type(wan.family), "decodes_causally", True)
    for f in range(3):
        assert np.array_equal(np.asarray(figures.timeline(wan_capture, wan, image=1, frame=f)), whole[f])
    assert [shape[2] for shape in decodes] == [1, 1, 2, 2, 3, 3]
    assert len(np.unique(whole[1].reshape(-1, 3), axis=0)) > 10  # a figure, not a blank canvas


def test_shared_decodes_each_step_once_whole(wan, wan_capture, decodes, monkeypatch):
    """With one ``decoded`` dict for all frames' figures each step is decoded once, all its latent frames, even
    where a prefix would do for the first figure (else the early frames would be decoded again)."""
    monkeypatch.setattr(type(wan.family), "decodes_causally", True)
    shared: dict = {}
    shown = [np.asarray(figures.timeline(wan_capture, wan, frame=f, decoded=shared)) for f in range(3)]
    assert [shape[2] for shape in decodes] == [3, 3] and sorted(shared) == wan_capture.index["steps"]
    assert all(pixels.shape[0] == 9 for pixels in shared.values())
    decodes.clear()
    assert all(np.array_equal(np.asarray(figures.timeline(wan_capture, wan, frame=f)), shown[f]) for f in range(3))


def test_given_rows_are_shown_as_given(tiny_sd):
    """Rows given are the figure's rows, the caller's list untouched; the default rows are every captured word,
    a second negative's too."""
    from negprompt.session import Session

    session = Session(tiny_sd)
    spec = session.spec(
        "a photo of a woman", negative=["red glasses", "a hat"], rule="dual", steps=2, size=32, seeds=[1]
    )
    words = {"positive": ["woman"], "negative": ["red"], "negative_2": ["hat"]}
    result = capture(spec, CaptureRequest(words), session, reducer=reduce_layer)
    width = figures.LABEL_WIDTH + len(result.index["steps"]) * figures.CELL
    rows = [("negative", "red")]
    assert figures.timeline(result, tiny_sd, rows=rows).size == (width, figures.HEADER + figures.CELL)
    assert rows == [("negative", "red")]
    assert figures.default_rows(result.index["words"]) == [
        ("positive", "woman"),
        ("negative", "red"),
        ("negative_2", "hat"),
    ]
    assert figures.timeline(result, tiny_sd).size == (width, figures.HEADER + 3 * figures.CELL)
