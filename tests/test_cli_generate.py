"""``negprompt generate``: PNG metadata, bit-exact --from-png, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_usage_error
from PIL import Image

from negprompt.interfaces.cli import main
from negprompt.interfaces.png import read_pixels, read_png_settings


def generate(tiny_sd_dir, out, *extra):
    args = [
        "generate",
        "a photo of a cat",
        "--model",
        str(tiny_sd_dir),
        "--steps",
        "4",
        "--size",
        "32",
        "-q",
        "--out",
        str(out),
    ]
    return main([*args, *extra])


def test_generate_writes_png_with_settings(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = generate(tiny_sd_dir, out, "--negative", "glasses", "--scheduler", "euler-a", "--seed", "7")
    assert code == 0 and out.exists()
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        infotext = image.text["parameters"]
        record = json.loads(image.text["negprompt"])
    assert infotext.splitlines()[0] == "a photo of a cat"
    assert "Negative prompt: glasses" in infotext and "Seed: 7" in infotext and "Sampler: euler-a" in infotext
    assert record["settings"]["guidance"]["negatives"][0]["prompt"] == "glasses"
    settings, index = read_png_settings(out)
    assert settings.seeds == (7,) and index == 0 and settings.steps == 4


def test_from_png_reproduces_every_image_of_a_batch_bit_exactly(tiny_sd_dir, tmp_path):
    out = tmp_path / "batch.png"
    code = generate(
        tiny_sd_dir,
        out,
        "--negative",
        "glasses",
        "--negative",
        "dog",
        "--rule",
        "dual",
        "--negative-scale",
        "3",
        "--negative-scale",
        "1.5",
        "--negative-window",
        "2:",
        "--negative-window",
        "0.25:0.75",
        "--seed",
        "1,2",
        "--scheduler",
        "euler-a",
    )
    assert code == 0
    for seed in (1, 2):
        original = tmp_path / f"batch-s{seed}.png"
        again = tmp_path / f"again-{seed}.png"
        assert main(["generate", "--from-png", str(original), "-q", "--out", str(again)]) == 0
        assert np.array_equal(read_pixels(original), read_pixels(again))
        assert read_png_settings(again) == read_png_settings(original)


def run_bad(capsys, tmp_path, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


BAD = [
    (["--scheduler", "karras"], "unknown scheduler 'karras'"),
    (["--rule", "magic"], "unknown rule 'magic'"),
    (["--steps", "0"], "argument --steps: '0' steps: give 1–1000"),
    (["--steps", "1001"], "1–1000"),
    (["--scale", "nan"], "guidance scale must be a finite number"),
    (["--scale", "inf"], "finite"),
    (["--negative", "dog", "--rule", "dual", "--negative-scale", "inf"], "finite"),
    (["--negative", "dog", "--negative-window", "9:"], "outside the schedule"),
    (["--negative", "dog", "--negative-window", "3:2"], "start must be below end"),
    (["--negative", "dog", "--negative-window", "0.8:0.5"], "empty"),
    (["--size", "30"], "multiple of 4"),
    (["--negative", "dog", "--negative-scale", "2"], "rule 'sd' has one scale"),
    (["--negative", "dog", "--negative", "cat"], "rule 'sd' takes one negative"),
    (["--negative", "dog", "--negative-window", "2:", "--negative-window", "3:"], "one per negative"),
]


MORE_BAD = [
    (["--negative", "dog", "--rescale", "-0.5"], "rescale φ must be in [0, 1]"),
    (["--negative", "dog", "--rule", "dng", "--dng-p-max", "1"], "p_max < 1"),
    (["--negative", "dog", "--rule", "dng", "--dng-prior", "0.9"], "must lie in"),
    (["--negative", "dog", "--rule", "apg", "--apg-momentum", "1.5"], "apg_momentum"),
    (["--negative", "dog", "--rule", "apg", "--apg-threshold", "-1"], "apg_norm_threshold"),
    (["--rule", "perp-neg"], "needs a negative"),
    (["--negative", "dog", "--dng-lambda", "3"], "--dng-lambda is an option of rule 'dng', but the rule is 'sd'"),
    (["--negative", "dog", "--rule", "dng", "--apg-eta", "1"], "add --rule apg or drop --apg-eta"),
    (["--interval", "2:9"], "outside the schedule"),
    (["--interval-sigma", "5:1"], "σ_lo < σ_hi"),
    (["--interval-sigma", "abc"], "LO:HI"),
    (["--negative", "(dog"], "unbalanced '('"),
    (["--negative", "[dog:20]"], "outside the schedule"),
]


@pytest.mark.parametrize("extra, message", BAD + MORE_BAD, ids=[b[1][:30] for b in BAD + MORE_BAD])
def test_bad_input_one_line_exit_2_no_file(tiny_sd_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never.png"
    assert_usage_error(generate(tiny_sd_dir, out, *extra), capsys, message)
    assert list(tmp_path.iterdir()) == []


def test_prompt_too_long_names_cut_words(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "long.png"
    prompt = " ".join(["cat"] * 75 + ["dog"])
    code = main(["generate", prompt, "--model", str(tiny_sd_dir), "--steps", "2", "-q", "--out", str(out)])
    assert_usage_error(code, capsys, "would be cut: 'dog'", out)


@pytest.mark.parametrize(
    "content, message", [(b"not an image", "cannot read"), (None, "carries no negprompt settings")]
)
def test_from_png_rejects_foreign_files(tmp_path, capsys, content, message):
    source = tmp_path / "foreign.png"
    if content is None:
        Image.new("RGB", (8, 8)).save(source)
    else:
        source.write_bytes(content)
    out = tmp_path / "out.png"
    code = main(["generate", "--from-png", str(source), "-q", "--out", str(out)])
    assert_usage_error(code, capsys, message, out)


def test_from_png_missing_file(tmp_path, capsys):
    code = main(["generate", "--from-png", str(tmp_path / "none.png"), "-q", "--out", str(tmp_path / "o.png")])
    assert_usage_error(code, capsys, "no such file", tmp_path / "o.png")


def test_console_script_exit_code(tmp_path):
    """The installed entry point returns 2 on bad input (argparse and our own errors alike)."""
    proc = subprocess.run(
        [sys.executable, "-m", "negprompt", "generate", "x", "--steps", "abc", "--out", str(tmp_path / "a.png")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not an integer" in proc.stderr


@pytest.mark.parametrize(
    "extra",
    [
        [
            "--rule",
            "perp-neg",
            "--negative",
            "dog",
            "--negative",
            "red hat",
            "--negative-scale",
            "1",
            "--negative-scale",
            "0.5",
        ],
        ["--rule", "dng", "--negative", "dog", "--dng-lambda", "3"],
        ["--rule", "apg", "--negative", "dog", "--apg-eta", "0.5", "--apg-momentum", "-0.5"],
        ["--negative", "dog", "--rescale", "0.7", "--interval-sigma", "0.5:20"],
        ["--negative", "[dog:0.5]", "--scheduler", "euler-a"],
        ["a (photo:1.3) of a [cat:dog:2]", "--negative", "((glasses))"],
    ],
    ids=["perp-neg", "dng", "apg", "rescale+interval", "delayed syntax", "weights"],
)
def test_more_rules_reproduce_from_png(tiny_sd_dir, tmp_path, extra):
    out = tmp_path / "x.png"
    if not extra[0].startswith("--"):
        argv = ["generate", extra[0], "--model", str(tiny_sd_dir), "--steps", "4", "-q", "--out", str(out), *extra[1:]]
        assert main(argv) == 0
    else:
        assert generate(tiny_sd_dir, out, *extra) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-q", "--out", str(again)]) == 0
    assert np.array_equal(read_pixels(out), read_pixels(again))


def test_one_window_for_several_negatives_applies_to_each(tiny_sd_dir, tmp_path):
    out = tmp_path / "two.png"
    extra = ["--rule", "dual", "-n", "glasses", "--negative-scale", "3", "-n", "dog", "--negative-scale", "2"]
    assert generate(tiny_sd_dir, out, *extra, "--negative-window", "0.3:") == 0
    settings, _ = read_png_settings(out)
    windows = [term.window for term in settings.guidance.negatives]
    assert [(w.start, w.end) for w in windows] == [(0.3, None), (0.3, None)]
    assert [term.scale for term in settings.guidance.negatives] == [3.0, 2.0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", "5-2"], "seed range '5-2' runs backwards; write it low-high, e.g. 2-5"),
        (["--seed", str(2**64)], f"seed {2**64} is outside 0–{2**64 - 1}"),
    ],
)
def test_seeds_that_cannot_be_meant(tiny_sd_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never.png"
    assert_usage_error(generate(tiny_sd_dir, out, *extra), capsys, message, out)


def test_a_window_ending_at_step_one_is_not_the_whole_schedule():
    from negprompt.guidance.windows import Window

    assert Window(0, 1.0).is_full and Window().is_full and Window(0.0, None).is_full
    assert not Window(0, 1).is_full and not Window(1).is_full


def test_an_output_that_cannot_be_written_fails_before_any_work(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    from negprompt import session as session_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(session_module, "load_components", never)
    assert_usage_error(generate(tiny_sd_dir, blocker / "out.png"), capsys, "is a file, not a folder")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_usage_error(generate(tiny_sd_dir, folder), capsys, "it is a folder; give a file name")
    code = main(["attend", "a photo of a cat", "--model", str(tiny_sd_dir), "--out", str(blocker / "maps")])
    assert_usage_error(code, capsys, "is a file, not a folder")


def test_outputs_get_the_mode_of_the_umask(tiny_sd_dir, tmp_path):
    import os

    old = os.umask(0o027)
    try:
        assert generate(tiny_sd_dir, tmp_path / "m.png") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o640


def test_from_png_refuses_settings_it_would_ignore(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert generate(tiny_sd_dir, out) == 0
    code = main(
        ["generate", "--from-png", str(out), "--steps", "9", "--dng-lambda", "2", "--out", str(tmp_path / "b.png")]
    )
    assert_usage_error(code, capsys, "drop --steps, --dng-lambda", tmp_path / "b.png")


def test_a_relative_model_path_is_recorded_absolute(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_sd_dir.parent)
    out = tmp_path / "rel.png"
    assert (
        main(
            [
                "generate",
                "a photo of a cat",
                "--model",
                tiny_sd_dir.name,
                "--steps",
                "2",
                "--size",
                "32",
                "-q",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    settings, _ = read_png_settings(out)
    assert settings.model == str(tiny_sd_dir.resolve())
