"""``negprompt attend`` on a video model (a saved tiny Wan folder): one timeline per latent frame (or the one of
``--frame``), the clip in place of the image, r_t per kept step and latent frame in strength.json equal to
``strength_over_frames`` of the saved maps, summary rows per frame and of the whole video; bad --frame in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_usage_error
from PIL import Image

from negprompt.analysis.strength import strength_curves, strength_over_frames
from negprompt.attention.result import AttentionCapture
from negprompt.interfaces.cli import main

PROMPT, NEGATIVE = "a cat on a mat", "a hat"
LATENT_FRAMES = 2  # 5 frames: Wan's latent frames 1 + (5 − 1) / 4


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from negprompt.models.saving import save_components
    from negprompt.testing.tiny_wan import build_tiny_wan

    return save_components(build_tiny_wan(seed=0), tmp_path_factory.mktemp("tiny-wan"))


def attend(wan_dir, out, *extra: str) -> int:
    """``negprompt attend`` on the tiny Wan: 32² px, 5 frames, 3 steps, two seeds, the negative from step 1."""
    base = ["attend", PROMPT, "-n", NEGATIVE, "--model", str(wan_dir), "--steps", "3", "--size", "32"]
    options = ["--frames", "5", "--seed", "1,2", "--scale", "4", "--negative-window", "1:", "-q", "--out", str(out)]
    return main([*base, *options, *extra])


@pytest.fixture(scope="module")
def attended(wan_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("attend") / "maps"
    assert attend(wan_dir, out, "--words", "cat,mat", "--negative-words", "hat") == 0
    return out


def test_a_video_writes_one_timeline_per_latent_frame_and_its_clip(attended):
    names = sorted(p.name for p in attended.iterdir())
    assert names == [
        "maps.json",
        "maps.safetensors",
        "strength.json",
        "summary.json",
        "timeline_frame_000.png",
        "timeline_frame_001.png",
        *(["video-s1.mp4", "video-s2.mp4"] if "video-s1.mp4" in names else ["video-s1.webp", "video-s2.webp"]),
        "video.json",
        "video_frames",
    ]
    figures = [np.asarray(Image.open(attended / f"timeline_frame_{f:03d}.png")) for f in range(LATENT_FRAMES)]
    assert figures[0].shape == figures[1].shape and figures[0].shape[0] > 128 * 3  # a header, 3 rows of words
    assert not np.array_equal(figures[0], figures[1])  # each frame its own maps and x̂₀ frame
    assert len(list((attended / "video_frames" / "clip_000").iterdir())) == 5


def test_strength_json_holds_r_t_per_step_and_frame_of_the_saved_maps(attended):
    record = json.loads((attended / "strength.json").read_text())
    loaded = AttentionCapture.load(attended)
    assert record["steps"] == [0, 1, 2] and record["latent_frames"] == loaded.frames == LATENT_FRAMES
    hat = record["words"]["hat"]
    expected, video = strength_over_frames(loaded, "hat"), strength_curves(loaded, "hat")
    assert hat["related"] == expected["related"] and set(hat["related"]) <= {"cat", "mat"}
    for definition in ("article", "released"):
        per_frame = hat["per_frame"][definition]  # [image][step][frame]
        assert len(per_frame) == 2 and all(len(steps) == 3 for steps in per_frame)
        assert per_frame[0][0] == [None, None]  # the negative's window starts at step 1
        values = torch.tensor([[[math.nan if v is None else v for v in s] for s in image] for image in per_frame])
        torch.testing.assert_close(values, expected[definition].permute(1, 0, 2), equal_nan=True)
        assert (values[:, 1:] > 0).all() and torch.isfinite(values[:, 1:]).all()
        whole = torch.tensor([[math.nan if v is None else v for v in image] for image in hat["video"][definition]])
        torch.testing.assert_close(whole, video[definition].T, equal_nan=True)


def test_summary_has_rows_per_frame_and_of_the_whole_video(attended):
    rows = json.loads((attended / "summary.json").read_text())
    cat = [r for r in rows if r["word"] == "cat" and r["step"] == 1 and r["image"] == 0]
    assert [r["frame"] for r in cat] == [0, 1, None]
    frames, whole = cat[:2], cat[2]
    assert whole["mass"] == pytest.approx(sum(r["mass"] for r in frames), rel=1e-5)
    for layer, norm in enumerate(whole["frobenius_per_layer"]):  # ‖F‖ over all frames = √Σ_f ‖F_f‖²
        assert norm == pytest.approx(math.hypot(*(r["frobenius_per_layer"][layer] for r in frames)), abs=2e-6)
    assert 0 <= whole["centroid_frame"] <= LATENT_FRAMES - 1 and 0 <= whole["centroid_x"] <= 1
    assert not any(r["branch"] == "negative" and r["step"] == 0 for r in rows)  # off before its window


def test_frame_option_draws_that_latent_frame_only(wan_dir, attended, tmp_path):
    out = tmp_path / "one"
    assert attend(wan_dir, out, "--words", "cat,mat", "--negative-words", "hat", "--frame", "1") == 0
    assert sorted(p.name for p in out.glob("timeline*")) == ["timeline_frame_001.png"]
    same = np.asarray(Image.open(attended / "timeline_frame_001.png"))
    assert np.array_equal(np.asarray(Image.open(out / "timeline_frame_001.png")), same)  # same run, same figure


def test_bad_frame_is_one_line_before_sampling(wan_dir, tiny_shapes_dir, tmp_path, capsys):
    out = tmp_path / "maps"
    assert_usage_error(attend(wan_dir, out, "--frame", "2"), capsys, "--frame 2 is outside the run's 2 latent", out)
    assert_usage_error(attend(wan_dir, out, "--frame", "-1"), capsys, "'-1' is negative", out)
    image = ["attend", "a red circle", "--model", str(tiny_shapes_dir), "--steps", "2", "-q", "--out", str(out)]
    assert_usage_error(main([*image, "--frame", "0"]), capsys, "--frame 0 given, but", out)


def test_frames_timelines_decode_each_step_once(wan_dir, tmp_path, monkeypatch):
    """Every latent frame's timeline draws over the same decoded x̂₀ of a step: one VAE decode per shown step,
    not one per step and frame (21 × 10 decodes on an 81-frame Wan run otherwise)."""
    import negprompt.attention.figures as figures

    calls = []
    original = figures.decode
    monkeypatch.setattr(figures, "decode", lambda *args: calls.append(1) or original(*args))
    assert attend(wan_dir, tmp_path / "maps", "--words", "cat", "--negative-words", "hat") == 0
    assert len(calls) == 3  # the three steps, shared by both latent frames' figures
