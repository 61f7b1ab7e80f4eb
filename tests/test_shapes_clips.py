"""Clips of the shapes world: seeded frames with per-frame truth, read back by the image detectors; the
temporal measures of negatives; the video model's training flag."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import assert_usage_error

from negprompt.errors import NegpromptError
from negprompt.interfaces.cli import main
from negprompt.shapes.clip_measures import (
    first_appearance,
    flicker,
    removal_per_frame,
    summarize_negative,
    validate_clip_frames,
)
from negprompt.shapes.clips import latent_frames, render_clip, sample_clip, sample_clip_example
from negprompt.shapes.detectors import detect
from negprompt.shapes.model import ShapesModelConfig
from negprompt.shapes.training import TrainConfig, Trainer, batch_of_clips

TINY = ShapesModelConfig(unet_widths=(16, 32), head_dim=8, text_width=32, text_layers=1, text_heads=2)
READ = ("shape", "color", "hat", "sun", "striped", "blurry")


def test_clips_are_deterministic_per_seed_and_follow_their_path():
    clip, caption = sample_clip_example(4, 7)
    again, caption_again = sample_clip_example(4, 7)
    assert clip == again and caption == caption_again
    assert np.array_equal(render_clip(clip, motion_blur=True), render_clip(again, motion_blur=True))
    others = [sample_clip_example(5, 7)[0], sample_clip_example(4, 8)[0]]
    assert all(other != clip for other in others)
    frames = render_clip(clip)
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8 and latent_frames(9) == 3
    xs = [clip.scene_at(frame).center[0] for frame in range(9)]
    assert abs(xs[-1] - xs[0]) >= 6 and np.allclose(np.diff(xs), np.diff(xs)[0])  # straight, constant speed
    assert not np.array_equal(frames[0], frames[-1])
    with pytest.raises(ValueError, match="4k \\+ 1"):
        sample_clip(np.random.default_rng(0), frames=8)


def test_nouns_appear_from_their_frame_and_captions_name_only_what_appears():
    rng = np.random.default_rng(11)
    clips = [sample_clip(rng) for _ in range(200)]
    midway = [c for c in clips if c.hat_from not in (None, 0)]
    assert len(midway) > 20 and any(c.sun_from not in (None, 0) for c in clips)
    for clip in midway:
        assert [s.hat for s in clip.scenes()] == [frame >= clip.hat_from for frame in range(clip.frames)]
    for index in range(200):
        clip, caption = sample_clip_example(2, index)
        for noun, when in (("hat", clip.hat_from), ("sun", clip.sun_from)):
            assert noun not in caption.split() or when is not None


def test_every_frame_attribute_matches_the_detectors():
    """A handful of clips, with and without motion blur: every frame read as the clip's truth says,
    including the frame a hat or a sun comes in."""
    rng = np.random.default_rng(3)
    clips = [sample_clip(rng, hat_from=4), sample_clip(rng, sun_from=2, hat_from=None)]
    clips += [sample_clip(rng) for _ in range(4)]
    wrong = []
    for clip in clips:
        for blur in (False, True):
            detections = [detect(frame) for frame in render_clip(clip, motion_blur=blur)]
            for frame, found in enumerate(detections):
                truth = clip.scene_at(frame)
                wrong += [(frame, a) for a in READ if getattr(found, a) != getattr(truth, a)]
            assert first_appearance(detections, "hat") == clip.hat_from
            assert first_appearance(detections, "sun") == clip.sun_from
    assert not wrong, wrong


def test_temporal_measures_of_a_negative():
    rng = np.random.default_rng(9)
    clips = [sample_clip(rng, hat_from=0, frames=5), sample_clip(rng, hat_from=3, frames=5)]
    plain = [[detect(f) for f in render_clip(c)] for c in clips]
    removed = [
        [detect(f) for f in render_clip(replace(c, hat_from=None, first=replace(c.first, hat=False)))] for c in clips
    ]
    late = [[detect(f) for f in render_clip(replace(c, hat_from=4))] for c in clips]
    assert removal_per_frame(plain, removed, "hat") == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert removal_per_frame(plain, late, "hat") == [1.0, 1.0, 1.0, 1.0, 0.0]  # both hats come in at frame 4
    summary = summarize_negative(plain, late, "hat")
    assert summary["had_thing"] == 2 and summary["removal_whole_clip"] == 0.0
    assert summary["mean_frames_later"] == pytest.approx(((4 - 0) + (4 - 3)) / 2)
    assert flicker(plain[0], "hat") == 0 and flicker(plain[1], "hat") == 1
    blinking = [plain[0][0], removed[0][1], plain[0][2], removed[0][3]]
    assert flicker(blinking, "hat") == 3 and first_appearance(removed[0], "hat") is None


def test_clip_validation_counts_every_frame():
    report = validate_clip_frames(3, seed=1, frames=5, motion_blur=True)
    for counts in report["attributes"].values():
        assert counts["right"] + counts["wrong"] + counts["unreadable"] == 15
    assert report["attributes"]["shape"]["right"] >= 14 and report["unreadable_frames"] == 0


def test_video_model_trains_two_steps_and_resumes(tmp_path):
    config = TrainConfig(
        samples=2,
        batch_size=1,
        learning_rate=1e-3,
        warmup_steps=1,
        checkpoint_every=1,
        log_every=1,
        model=TINY,
        frames=5,
    )
    pixels, captions, things = batch_of_clips(0, 0, 2, 5)
    assert pixels.shape == (2, 3, 5, 32, 32) and things.shape == (2, 1, 5, 32, 32) and len(captions) == 2
    trainer = Trainer(config, tmp_path / "video")
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    log = trainer.run(progress=False)
    assert [entry["step"] for entry in log] == [1, 2] and all(np.isfinite(entry["loss"]) for entry in log)
    assert any(not torch.equal(before[k], v) for k, v in trainer.unet.state_dict().items())
    resumed = Trainer(config, tmp_path / "video")
    resumed.load_checkpoint()
    assert resumed.step == 2
    image_config = TrainConfig(**{**config.to_json(), "model": TINY, "frames": 0})
    with pytest.raises(NegpromptError, match="another model"):
        Trainer(image_config, tmp_path / "video").load_checkpoint()


def test_frames_are_checked_and_old_configs_train_images(tmp_path, capsys):
    legacy = TrainConfig(model=TINY).to_json()
    del legacy["frames"]
    assert TrainConfig.from_json(legacy).frames == 0
    with pytest.raises(NegpromptError, match="4k \\+ 1"):
        TrainConfig(model=TINY, frames=8)
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "-q", "--frames", "6"])
    assert_usage_error(code, capsys, "--frames: a clip has 4k + 1 frames", out)


def test_an_inflated_image_unet_denoises_every_frame_as_the_image_unet():
    """Frames folded into the batch, temporal layers at zero: the video UNet started from an image UNet
    (without pooled text, which the 3-D UNet takes elsewhere) predicts each frame's ε as the image UNet does."""
    from negprompt.shapes.model import build_unet
    from negprompt.shapes.video_model import build_video_unet, inflate

    plain = ShapesModelConfig(**{**TINY.to_json(), "pooled_text_embedding": False})
    torch.manual_seed(0)
    image_unet, video_unet = build_unet(plain).eval(), build_video_unet(plain).eval()
    assert inflate(video_unet, image_unet.state_dict()) == []
    clips = torch.randn(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 6, plain.text_width, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([10, 700])
    pooled = torch.randn(2, plain.text_width)
    with torch.no_grad():
        video = video_unet(clips, timesteps, text, timestep_cond=pooled).sample
        frames = clips.permute(0, 2, 1, 3, 4).reshape(10, 3, 32, 32)  # (B·F, C, H, W)
        image = image_unet(frames, timesteps.repeat_interleave(5), text.repeat_interleave(5, dim=0)).sample
    assert torch.allclose(video.permute(0, 2, 1, 3, 4).reshape(10, 3, 32, 32), image, atol=1e-5)
    with torch.no_grad():
        video_unet.transformer_in.proj_out.weight.add_(0.1)  # a temporal layer that acts mixes the frames
        mixed = video_unet(clips, timesteps, text, timestep_cond=pooled).sample
    assert not torch.allclose(mixed.permute(0, 2, 1, 3, 4).reshape(10, 3, 32, 32), image, atol=1e-3)
