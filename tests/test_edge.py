"""The edge: every bound of the command line and the run specification, outputs that are never
silently replaced, and a command line that answers without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import assert_usage_error

from negprompt.errors import NegpromptError
from negprompt.interfaces.cli import main

GENERATE = ["generate", "a red circle with a hat", "--steps", "2", "-q"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "1001"], "give 1–1000"),
        (["--steps", "0"], "give 1–1000"),
        (["--size", "8193"], "give 1–8192"),
        (["--width", "0"], "give 1–8192"),
        (["--seed", "18446744073709551616"], "outside 0–18446744073709551615"),
        (["--seed", "-1"], "outside 0–"),
        (["--seed", "0-20000"], "over 10000 images"),
        (["--seed", "5-2"], "runs backwards"),
        (["--scale", "101"], "outside ±100"),
        (["--rule", "dual", "-n", "a hat", "--negative-scale", "-200"], "outside ±100"),
        (["--rescale", "1.5"], "rescale φ must be in [0, 1]"),
        (["--negative-window", "0.8:0.2", "-n", "a hat"], "start must be below end"),
        (["--dng-lambda", "3"], "is an option of rule 'dng'"),
        (["-n", "(a hat:5)"], "weights must be within ±4"),
        (["-n", "((((((((((((((((hat))))))))))))))))"], "weights must be within ±4"),
        (["--scheduler", "karras"], "unknown scheduler 'karras'"),
        (["--rule", "nosuch"], "unknown rule 'nosuch'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
    ],
)
def test_each_bound_of_generate_is_one_line(extra, message, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert_usage_error(main(GENERATE + extra + ["--out", str(out)]), capsys, message, out)


def test_steps_whose_first_noise_level_is_too_high_are_refused_on_the_bundled_model(tmp_path, capsys):
    """The bundled model declares max_sigma: 100 steps start at σ = 80 (flat or white images, see
    docs/training.md); 300 steps start lower (leading spacing) and run."""
    out = tmp_path / "out.png"
    argv = ["generate", "a red circle", "--seed", "6", "-q", "--out", str(out)]
    assert_usage_error(main(argv + ["--steps", "100"]), capsys, "start at noise level σ = 80", out)
    from negprompt.session import Session

    session = Session()
    with pytest.raises(NegpromptError, match="nearest step count below that starts low enough is 197"):
        session.spec("a red circle", steps=200, scheduler="ddim")
    assert session.spec("a red circle", steps=300).steps == 300


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("attend", ["--memory-limit", "0"], "--memory-limit: '0' must be above 0"),
        ("attend", ["--columns", "0"], "not a positive integer"),
        ("attend", ["--image", "3"], "outside the batch of 1 image"),
        ("edit", ["-n", "a hat", "--threshold", "1"], "threshold must be in (0, 1)"),
        ("edit", ["-n", "a hat", "--rows-per-call", "0"], "not a positive integer"),
    ],
)
def test_bounds_of_attend_and_edit(command, extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [command, "a red circle with a hat", "--steps", "2", "-q", "--out", str(out)]
    assert_usage_error(main(argv + extra), capsys, message, out)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "steps must be a whole number in 1–1000"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"height": 0}, "height must be a whole number in 1–8192"),
        ({"width": 9000}, "width must be a whole number in 1–8192"),
        ({"seeds": ()}, "a run makes 1–10000 images"),
        ({"seeds": (1.5,)}, "seeds must be whole numbers"),
        ({"seeds": (2**64,)}, "outside 0–"),
        ({"eta": float("nan")}, "eta must be a finite number"),
        ({"rows_per_call": 0}, "rows per UNet call"),
        ({"device": "tpu"}, "run device"),
    ],
)
def test_each_bound_of_the_run_specification(fields, message):
    from dataclasses import replace

    from negprompt.guidance.plan import Guidance, Term
    from negprompt.runspec import RunSpec

    spec = RunSpec(Guidance(positive=Term("a red circle")), steps=2, height=64, width=64)
    with pytest.raises(NegpromptError, match=message.replace("(", r"\(").replace("+", r"\+")):
        replace(spec, **fields)


def test_png_settings_keep_their_types(tmp_path):
    """A PNG's JSON with 2.5 steps or a seed "x" is refused, not rounded or crashed on."""
    from negprompt.guidance.plan import Guidance, Term
    from negprompt.runspec import RunSpec, SettingsError

    record = RunSpec(Guidance(positive=Term("a red circle")), steps=2, height=64, width=64).to_json()
    for field, value in (("steps", 2.5), ("seeds", ["x"]), ("seeds", 3), ("height", "64"), ("guidance", [1])):
        with pytest.raises(SettingsError, match=field):
            RunSpec.from_json({**record, field: value})
    assert RunSpec.from_json(record).steps == 2


# ---------------------------------------------------------------- outputs


def test_existing_outputs_are_replaced_with_a_word_or_refused_with_no_overwrite(tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["generate", "a red circle", "--steps", "2", "-q", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    before = out.stat().st_mtime_ns
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"replaced {out}"
    out.write_bytes(b"precious")
    assert main(argv + ["--no-overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: error: ") and "exists" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"precious" and before  # untouched
    folder = tmp_path / "edit"
    edit = ["edit", "a red circle", "-n", "a hat", "--steps", "2", "-q", "--out", str(folder)]
    assert main(edit) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(edit) == 0
    assert all(line.startswith(("replaced", "UNet rows")) for line in capsys.readouterr().out.splitlines())
    assert_usage_error(main(edit + ["--no-overwrite"]), capsys, "exists")


# ---------------------------------------------------------------- instant command line

HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL")


def main_in_a_fresh_interpreter(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs ``main(argv)`` in a new Python; its last stdout line is the exit code and the heavy modules imported."""
    program = (
        "import sys\n"
        "from negprompt.interfaces.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as stop:\n"
        "    code = stop.code\n"
        f"print(code, [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["generate", "--help"],
        ["train", "--help"],
        ["generate", "--stepz", "3"],
        ["generate", "x", "--steps", "0"],
        ["generate", "x", "--dng-lambda", "3"],
        ["generate", "(hat:9)"],
        ["generate", "x", "--scheduler", "karras"],
        ["edit", "x", "-n", "y", "--threshold", "2"],
        ["nosuchcommand"],
        # an output under a file: every command checks its destination before importing the model code
        ["demo", "--out", "/dev/null/demo"],
        ["study", "shapes", "--out", "/dev/null/study"],
        ["train", "--out", "/dev/null/train"],
        ["evaluate", "--out", "/dev/null/evaluation"],
        ["bench-methods", "--out", "/dev/null/methods"],
        ["edit-sweep", "--pair", "a red circle->a hat", "--out", "/dev/null/sweep"],
    ],
)
def test_help_and_usage_errors_import_neither_torch_nor_diffusers(argv):
    done = main_in_a_fresh_interpreter(argv)
    assert done.stdout.strip().splitlines()[-1] in ("0 []", "2 []"), (done.stdout[-500:], done.stderr[-500:])


def test_every_option_says_its_default():
    import argparse

    from negprompt.interfaces.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, parser in commands.choices.items()
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, argparse._HelpAction)
        and not action.required
        and "default" not in (action.help or "").lower()
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scale", "1e18"], "guidance scale 1e+18 is outside ±100"),
        (["--negative-scale=-1e18"], "negative scale -1e+18 is outside ±100"),
        (["--rule", "dng", "--dng-lambda", "1e18"], "dng_strength (λ) 1e+18 is outside ±100"),
        (["--rule", "apg", "--apg-eta", "1e18"], "apg_eta (η) 1e+18 is outside ±100"),
        (["--rule", "vsf", "--vsf-scale", "1e18"], "vsf_scale (λ) 1e+18 is outside ±100"),
        (["--rule", "nag", "--nag-scale", "500"], "nag_phi (φ) 500 is outside ±100"),
        (["--rule", "nag", "--nag-tau", "nan"], "nag_tau must be a finite number, got nan"),
        (["--interval-sigma", "0:nan"], "noise-level interval needs 0 ≤ σ_lo < σ_hi"),
        (["--seed", "0-3,2"], "seed 2 is given twice in '0-3,2'"),
    ],
)
def test_numbers_are_refused_before_the_model_loads(extra, message):
    """Scales, rule options, σ-intervals and repeated seeds are checked on their own: a model that does not
    exist is never reached, nothing heavy is imported, and the error is one line."""
    argv = ["generate", "a red circle", "-n", "a hat", "--model", "/nonexistent/model", *extra]
    done = main_in_a_fresh_interpreter(argv)
    assert done.stdout.strip().splitlines()[-1] == "2 []", (done.stdout[-500:], done.stderr[-500:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "/nonexistent" not in lines[0], lines


@pytest.mark.parametrize("command", ["evaluate", "bench-methods", "edit-sweep"])
def test_a_refused_scale_leaves_no_job_behind(command, tmp_path, capsys):
    """The scale is refused while the arguments are parsed: no job.json, logs or shards for a rerun to trip on."""
    out = tmp_path / "out"
    code = main([command, "--scale", "inf", "--out", str(out)])
    assert_usage_error(code, capsys, "guidance scale must be a finite number, got inf", out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--max-minutes", "-1"], "argument --max-minutes: '-1' must be above 0"),
        (["train", "--max-minutes", "nan"], "argument --max-minutes: 'nan' is not a finite number"),
        (["edit-sweep", "--tau", "nan"], "argument --tau: 'nan' is not a finite number"),
        (["attend", "a red circle", "--word", "circle", "--memory-limit", "nan"], "'nan' is not a finite number"),
    ],
)
def test_numbers_that_would_run_silently_wrong_are_refused(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert_usage_error(main([*argv, "--out", str(out)]), capsys, message, out)
