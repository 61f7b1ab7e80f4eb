"""What a video run writes (negprompt/interfaces/video.py): MP4 (PyAV, H.264) or animated WebP, the frames as
PNGs, the run's JSON and the settings in the container's metadata; ``generate --from-json`` reruns a run (the
tiny Wan's, the bundled model's images) bit-identically; bad input (no encoder, hostile JSON) is one line,
exit 2, before any model loads. The writers' round trips run on synthetic smooth clips."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree

import numpy as np
import pytest
from helpers import assert_usage_error
from PIL import Image, ImageSequence

from negprompt.guidance.plan import Guidance, Term
from negprompt.interfaces.cli import main
from negprompt.interfaces.png import read_pixels, read_png_settings
from negprompt.interfaces.video import (
    XMP_NAMESPACE,
    read_run_json,
    run_record,
    save_video_generation,
    video_paths,
    write_run_json,
)
from negprompt.limits import MAX_SETTINGS_BYTES
from negprompt.runspec import RunSpec, to_uint8

av = pytest.importorskip("av")  # the test extra installs it (pyproject.toml)

SPEC = RunSpec(
    model="shapes",
    guidance=Guidance("sd", Term("a red circle"), (Term("a hat"),)),
    steps=2,
    seeds=(3, 5),
    height=32,
    width=48,
    frames=5,
)
# Mean |Δ| in 8-bit levels an H.264 round trip (crf 18) may leave on smooth_clips' frames, whose colours change
# by up to 5 levels a pixel at 32×48. Measured: 2.5 with 4:2:0 chroma at 32×48 (2.0 of it the RGB → YUV 4:2:0
# → RGB conversion alone, which averages chroma over 2×2 pixels), 2.4 with 4:4:4 at 17×23 (steeper gradients).
MEAN_LEVELS = 3.5


def smooth_clips(clips: int = 2, frames: int = 5, height: int = 32, width: int = 48) -> np.ndarray:
    """Frames (B, F, H, W, 3) in [0, 1]: gradients that move from frame to frame (each frame different)."""
    b, f, y, x = np.meshgrid(
        np.arange(clips), np.arange(frames), np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij"
    )
    red = 0.5 + 0.3 * np.sin(np.pi * (x + 0.1 * f + 0.3 * b))
    green = 0.5 + 0.3 * np.cos(np.pi * (y - 0.07 * f))
    blue = 0.2 + 0.4 * x * y
    return np.stack([red, green, blue], axis=-1).astype(np.float32)


def decode_mp4(path: Path) -> tuple[np.ndarray, dict, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, dict(container.metadata), float(stream.average_rate)


def test_mp4_round_trip_frames_pngs_json_and_metadata(tmp_path):
    pixels = smooth_clips()
    lines, note = save_video_generation(SimpleNamespace(spec=SPEC, pixels=pixels), tmp_path / "clip.mp4", fps=12)
    paths = video_paths(tmp_path / "clip.mp4", SPEC.seeds, "mp4")
    assert note == "" and [p.name for p in paths.clips] == ["clip-s3.mp4", "clip-s5.mp4"]
    assert lines[0] == f"wrote {paths.clips[0]}" and lines[-1] == f"wrote {tmp_path / 'clip.json'}"
    expected = to_uint8(pixels)
    for clip, path in enumerate(paths.clips):
        frames, metadata, rate = decode_mp4(path)
        assert frames.shape == (5, 32, 48, 3) and rate == 12
        error = np.abs(frames.astype(int) - expected[clip]).mean()
        assert error <= MEAN_LEVELS, error
        assert json.loads(metadata["comment"]) == SPEC.to_json() | {"frames": 5, "fps": 12.0}
        for index in range(5):  # the PNGs are the run's pixels exactly
            assert np.array_equal(read_pixels(paths.frame(clip, index, 5)), expected[clip, index])
    assert sorted(p.name for p in (paths.frames / "clip_001").iterdir())[-1] == "frame_004.png"
    record = json.loads(paths.settings.read_text())
    assert record["settings"] == SPEC.to_json() and record["infotext"] == [SPEC.infotext(0), SPEC.infotext(1)]
    assert record["files"] == {"videos": ["clip-s3.mp4", "clip-s5.mp4"], "frames": "clip_frames"}
    assert read_run_json(paths.settings) == type(read_run_json(paths.settings))(SPEC, "video", 5, 12.0)


def test_an_encoder_that_fails_leaves_no_file_of_the_run(tmp_path, monkeypatch):
    import negprompt.interfaces.video as video

    def failing_job(*args):
        def write(to):
            raise RuntimeError("the encoder broke")

        return write

    monkeypatch.setattr(video, "_video_job", failing_job)
    with pytest.raises(RuntimeError, match="the encoder broke"):
        save_video_generation(SimpleNamespace(spec=SPEC, pixels=smooth_clips()), tmp_path / "clip.webp")
    assert list(tmp_path.iterdir()) == []  # no frames folder, no JSON, no temporaries


def test_a_shorter_run_at_the_same_out_replaces_the_frames_folder_whole(tmp_path):
    save_video_generation(SimpleNamespace(spec=SPEC, pixels=smooth_clips(2, 5)), tmp_path / "c.webp")
    spec = replace(SPEC, seeds=(3,), frames=3)
    lines, _ = save_video_generation(SimpleNamespace(spec=spec, pixels=smooth_clips(1, 3)), tmp_path / "c.webp")
    assert lines[1] == f"replaced {tmp_path / 'c_frames'}/ (1 clip × 3 frames, PNG)"
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "c_frames").rglob("*.png")) == [
        f"c_frames/clip_000/frame_00{i}.png" for i in range(3)
    ]


def test_an_odd_sized_clip_is_encoded_in_4_4_4(tmp_path):
    pixels = smooth_clips(1, 3, 17, 23)
    spec = replace(SPEC, seeds=(0,), height=17, width=23, frames=3)
    save_video_generation(SimpleNamespace(spec=spec, pixels=pixels), tmp_path / "odd.mp4")
    frames, _, rate = decode_mp4(tmp_path / "odd.mp4")
    assert frames.shape == (3, 17, 23, 3) and rate == 16
    assert np.abs(frames.astype(int) - to_uint8(pixels)[0]).mean() <= MEAN_LEVELS
    with av.open(str(tmp_path / "odd.mp4")) as container:
        assert container.streams.video[0].format.name == "yuv444p"


def test_webp_is_lossless_and_carries_the_settings(tmp_path):
    pixels = smooth_clips(1, 4)
    spec = replace(SPEC, seeds=(9,), frames=4)
    lines, note = save_video_generation(SimpleNamespace(spec=spec, pixels=pixels), tmp_path / "a.webp", fps=8)
    assert note == "" and lines[0] == f"wrote {tmp_path / 'a.webp'}"
    with Image.open(tmp_path / "a.webp") as image:
        frames = np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)])
        xmp = image.info["xmp"]
        duration = image.info["duration"]
    assert np.array_equal(frames, to_uint8(pixels)[0]) and duration == 125
    description = ElementTree.fromstring(xmp).find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert json.loads(description.get(f"{{{XMP_NAMESPACE}}}settings")) == spec.to_json() | {"frames": 4, "fps": 8.0}


def without_av(monkeypatch) -> None:
    """As if PyAV were not installed: ``import av`` raises ImportError."""
    monkeypatch.setitem(sys.modules, "av", None)


def test_without_av_a_video_falls_back_to_webp_with_one_note(tmp_path, monkeypatch):
    without_av(monkeypatch)
    pixels = smooth_clips(1, 3)
    spec = replace(SPEC, seeds=(0,), frames=3)
    lines, note = save_video_generation(SimpleNamespace(spec=spec, pixels=pixels), tmp_path / "v.png")
    assert lines[0] == f"wrote {tmp_path / 'v.webp'}" and not (tmp_path / "v.mp4").exists()
    assert "'av'" in note and "pip install 'negprompt[video]'" in note and len(note.splitlines()) == 1


def test_without_av_out_mp4_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    without_av(monkeypatch)
    no_model(monkeypatch)
    out = tmp_path / "v.mp4"
    code = main(["generate", "a red circle", "-q", "--out", str(out)])
    message = "the package 'av' (PyAV) is not installed (pip install 'negprompt[video]'); or give --out v.webp"
    assert_usage_error(code, capsys, message, out, tmp_path / "v.json")


def no_model(monkeypatch) -> None:
    import negprompt.session as session_module

    monkeypatch.setattr(session_module, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory):
    from negprompt.models.saving import save_components
    from negprompt.testing.tiny_wan import build_tiny_wan

    return save_components(build_tiny_wan(seed=0), tmp_path_factory.mktemp("tiny-wan"))


def test_a_wan_run_writes_mp4_frames_json_and_reruns_bit_identically(tiny_wan_dir, tmp_path, capsys):
    """The tiny Wan through the command line: 2 clips of 5 frames; --from-json makes the same frames."""
    out = tmp_path / "wan.mp4"
    options = ["--model", str(tiny_wan_dir), "--frames", "5", "--size", "32", "--steps", "2", "--seed", "0,1"]
    assert main(["generate", "a cat", "-n", "a hat", *options, "-q", "--out", str(out)]) == 0
    paths = video_paths(out, (0, 1), "mp4")
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {paths.settings}"
    record = read_run_json(paths.settings)
    assert (record.kind, record.frames, record.settings.frames, record.settings.model) == (
        "video",
        5,
        5,
        str(tiny_wan_dir),
    )
    frames, metadata, _ = decode_mp4(paths.clips[1])
    assert frames.shape == (5, 32, 32, 3) and json.loads(metadata["comment"])["frames"] == 5
    again = tmp_path / "again.png"  # a video record writes its video beside a .png --out
    assert main(["generate", "--from-json", str(paths.settings), "-q", "--out", str(again)]) == 0
    again_paths = video_paths(again, (0, 1), "mp4")
    pngs = [np.stack([read_pixels(paths.frame(clip, f, 5)) for f in range(5)]) for clip in range(2)]
    for clip in range(2):
        assert np.array_equal(pngs[clip], np.stack([read_pixels(again_paths.frame(clip, f, 5)) for f in range(5)]))
        assert not np.array_equal(pngs[clip][0], pngs[clip][-1])  # a video, not a still repeated
    # the decoded MP4 of seed 1 is its clip: random-weight frames are noisy, H.264 leaves 3.9 levels on them (the
    # tiny Wan's two seeds differ less than that, so the other clip is about as near)
    errors = [np.abs(frames.astype(int) - pngs[clip]).mean() for clip in range(2)]
    assert errors[1] <= min(6, errors[0]), errors


def test_without_av_a_wan_run_writes_webp_and_says_so_in_one_warning(tiny_wan_dir, tmp_path, capsys, monkeypatch):
    without_av(monkeypatch)
    out = tmp_path / "wan.png"
    options = ["--model", str(tiny_wan_dir), "--frames", "5", "--size", "32", "--steps", "2"]
    assert main(["generate", "a cat", *options, "-q", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"wrote {tmp_path / 'wan.webp'}" and not out.exists()
    assert captured.err.strip() == (
        "negprompt: warning: no MP4 encoder (the package 'av' (PyAV) is not installed): wrote animated WebP; "
        "pip install 'negprompt[video]' writes MP4"
    )
    with Image.open(tmp_path / "wan.webp") as image:
        assert image.n_frames == 5 and image.size == (32, 32)


def test_from_json_reruns_an_image_run_bit_identically(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert (
        main(["generate", "a blue square", "-n", "striped", "--steps", "3", "--seed", "4,7", "-q", "--out", str(out)])
        == 0
    )
    firsts = [tmp_path / "img-s4.png", tmp_path / "img-s7.png"]
    settings, _ = read_png_settings(firsts[0])
    write_run_json(tmp_path / "img.json", run_record(settings))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-json", str(tmp_path / "img.json"), "-q", "--out", str(again)]) == 0
    for first, seed in zip(firsts, (4, 7)):
        assert np.array_equal(read_pixels(first), read_pixels(tmp_path / f"again-s{seed}.png"))
    assert read_png_settings(tmp_path / "again-s7.png") == (settings, 1)


def record_text(**changes) -> str:
    record = run_record(SPEC, frames=5, fps=16.0)
    for key, value in changes.items():
        if key.startswith("settings_"):
            record["settings"][key.removeprefix("settings_")] = value
        else:
            record[key] = value
    return json.dumps(record)


HOSTILE_JSON = {
    "not UTF-8": (b'{"kind": "\xff"}', "is not UTF-8 text (byte at offset 10)"),
    "a list": (b"[1, 2]", "holds a JSON list, not an object"),
    "arrays 200 000 deep": (b"[" * 200_000, "nests JSON too deeply"),
    "objects 100 000 deep": (b'{"a":' * 100_000, "nests JSON too deeply"),
    "over 1 MB": (b'{"a": "' + b" " * MAX_SETTINGS_BYTES + b'"}', f"is over {MAX_SETTINGS_BYTES} bytes"),
    "not JSON": (b"{'kind': 'video'}", "is not valid JSON"),
    "NaN": (record_text().replace('"fps": 16.0', '"fps": NaN').encode(), "NaN is not a JSON number"),
    "an unknown key": (record_text(sampler="euler").encode(), "unknown key(s) 'sampler'"),
    "an unknown settings key": (record_text(settings_cfg=7).encode(), "unknown settings key(s) 'cfg'"),
    "steps as text": (record_text(settings_steps="8").encode(), "settings field 'steps' must be int, got '8'"),
    "frames 2.5": (record_text(frames=2.5).encode(), "'frames' must be a whole number ≥ 1, got 2.5"),
    "fps -1": (record_text(fps=-1).encode(), "'fps': frame rate -1"),
    "frames not the settings'": (record_text(frames=9).encode(), "its settings make 5 frames, its 'frames' says 9"),
    "kind gif": (record_text(kind="gif").encode(), '"kind": "image" or "video"'),
    "settings a string": (record_text(settings="x").encode(), "settings must be a JSON object, got str"),
    "guidance malformed": (record_text(settings_guidance=[1]).encode(), "settings field 'guidance' is malformed"),
}


@pytest.mark.parametrize("case", HOSTILE_JSON)
def test_a_damaged_or_hostile_json_is_one_line_before_any_model_loads(case, tmp_path, capsys, monkeypatch):
    content, message = HOSTILE_JSON[case]
    source = tmp_path / "run.json"
    source.write_bytes(content)
    no_model(monkeypatch)
    out = tmp_path / "out" / "again.mp4"
    code = main(["generate", "--from-json", str(source), "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out, out.parent)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "9"], "--from-json regenerates with the JSON's own settings; drop --steps"),
        (["a prompt"], "--from-json takes its prompts from the JSON"),
        (["--from-png", "x.png"], "give --from-png FILE or --from-json FILE, not both"),
        (["--fps", "0"], "'0' must be above 0"),
        (["--fps", "5000"], "frame rate 5000.0: give a number of frames a second above 0, at most 1000"),
    ],
)
def test_from_json_refuses_what_it_would_ignore(extra, message, tmp_path, capsys, monkeypatch):
    source = tmp_path / "run.json"
    source.write_text(record_text())
    no_model(monkeypatch)
    out = tmp_path / "again.mp4"
    code = main(["generate", "--from-json", str(source), *extra, "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out)


def test_an_image_json_wants_a_png_out_and_a_missing_json_is_named(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    source = tmp_path / "img.json"
    source.write_text(json.dumps(run_record(replace(SPEC, frames=1))))
    code = main(["generate", "--from-json", str(source), "-q", "--out", str(tmp_path / "x.mp4")])
    assert_usage_error(code, capsys, "records images, not a video; give --out NAME.png", tmp_path / "x.mp4")
    code = main(["generate", "--from-json", str(tmp_path / "none.json"), "-q", "--out", str(tmp_path / "y.mp4")])
    assert_usage_error(code, capsys, "no such file", tmp_path / "y.mp4")


def test_no_overwrite_refuses_a_wan_runs_existing_json_before_sampling(tiny_wan_dir, tmp_path, capsys, monkeypatch):
    from negprompt.session import Session

    monkeypatch.setattr(Session, "run", lambda *a, **k: pytest.fail("sampled"))
    (tmp_path / "wan.json").write_text("{}")
    options = ["--model", str(tiny_wan_dir), "--frames", "5", "--size", "32", "--steps", "2", "--no-overwrite"]
    code = main(["generate", "a cat", *options, "-q", "--out", str(tmp_path / "wan.png")])
    assert_usage_error(code, capsys, "wan.json exists", tmp_path / "wan.mp4", tmp_path / "wan_frames")


def test_no_overwrite_refuses_an_existing_video_before_any_model_loads(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    (tmp_path / "v.mp4").write_bytes(b"old")
    code = main(["generate", "a red circle", "--no-overwrite", "-q", "--out", str(tmp_path / "v.mp4")])
    assert_usage_error(code, capsys, "v.mp4 exists", tmp_path / "v.json")
    assert (tmp_path / "v.mp4").read_bytes() == b"old"
