"""Fuzz tests of the edge: random argument lists, prompts, PNG metadata and study specs.

Whatever goes in, negprompt answers with exit 0 and its outputs, or exit 2, exactly one line on
stderr and no output; never a traceback (an exception escaping ``main``) and never exit 1. The
number of generated cases is counted and printed at the end of the test session (see conftest.py).
"""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from negprompt.interfaces.cli import main

CASES: Counter = Counter()  # "<kind> exit <code>" → generated cases, reported by conftest.py

SHAPES_WORDS = "a with and shape red green blue purple circle square triangle hat sun striped blurry".split()
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI stays reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module", autouse=True)
def loaded_once(monkeypatch_module):
    """Each model is loaded once for the module (loading is tested elsewhere; here it is the edge)."""
    import negprompt.session as session_module

    cache: dict = {}
    original = session_module.load_components

    def cached(model, device, dtype):
        key = (str(model), device, str(dtype))
        if key not in cache:
            cache[key] = original(model, device=device, dtype=dtype)
        return cache[key]

    monkeypatch_module.setattr(session_module, "load_components", cached)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def prompts(words: list[str]) -> st.SearchStrategy[str]:
    """Prompts of the model's words, A1111 syntax (weights, edits, escapes), unicode and long ones."""
    word = st.sampled_from(words)
    weight = st.sampled_from(["1.2", "0.5", "-1", "0", "1e9", "nan", "inf", "11", "x", "", "1e-9"])
    syntax = st.one_of(
        word,
        st.builds(lambda w, n: f"({w}:{n})", word, weight),
        st.builds(lambda w: f"(({w}))", word),
        st.builds(lambda w, v, n: f"[{w}:{v}:{n}]", word, word, st.sampled_from(["0.5", "3", "-1", "2.5", "x"])),
        st.builds(lambda w: f"[{w}]", word),
        st.sampled_from(["(", ")", "[", "]", ":", "\\(", "BREAK", ",", "."]),
        st.text(alphabet=string.printable + "éß漢字🙂\u200b\x00", max_size=12),
    )
    return st.lists(syntax, max_size=8).map(" ".join) | st.sampled_from(["", " ", "hat " * 100])


def numbers() -> st.SearchStrategy[str]:
    return st.sampled_from(["0", "1", "2", "-1", "3", "7.5", "1e9", "-1e9", "nan", "inf", "x", "", "0.5", "1001"])


def seeds() -> st.SearchStrategy[str]:
    return st.sampled_from(
        ["0", "1,2", "0-1", "5-2", "-1", "18446744073709551615", "18446744073709551616", "x", "1,,2", "3-", ""]
    )


def option_lists(words: list[str]) -> st.SearchStrategy[list[str]]:
    """Flags of ``generate`` with values mostly small enough to run in a moment."""
    steps = st.sampled_from(["1", "2", "3", "0", "-2", "1001", "x", "2.5"])
    windows = st.sampled_from(["1:", ":1", "0.5:", "0:1", "3:2", "1.5:", "0.2:0.8", "x", "", "1:1", "-1:"])
    size = st.sampled_from(["32", "64", "0", "33", "-32", "x", "100000"])
    flag_values = st.one_of(
        st.tuples(st.just("--steps"), steps),
        st.tuples(st.just("--scale"), numbers()),
        st.tuples(st.just("--seed"), seeds()),
        st.tuples(st.just("--size"), size),
        st.tuples(st.just("--width"), size),
        st.tuples(st.just("--height"), size),
        st.tuples(st.just("--negative"), prompts(words)),
        st.tuples(st.just("--negative-scale"), numbers()),
        st.tuples(st.just("--negative-window"), windows),
        st.tuples(st.just("--interval"), windows),
        st.tuples(st.just("--interval-sigma"), st.sampled_from(["0.3:5", "5:0.3", "x", "1:2:3", "nan:1"])),
        st.tuples(st.just("--rule"), st.sampled_from(["sd", "cfg", "dual", "weighted", "perp-neg", "dng", "apg", "x"])),
        st.tuples(st.just("--scheduler"), st.sampled_from(["ddim", "euler-a", "default", "x", ""])),
        st.tuples(st.just("--rescale"), numbers()),
        st.tuples(st.just("--dng-lambda"), numbers()),
        st.tuples(st.just("--apg-threshold"), numbers()),
        st.tuples(st.just("--device"), st.sampled_from(["cpu", "auto", "cuda", "tpu"])),
        st.tuples(st.just("--dtype"), st.sampled_from(["float32", "bfloat16", "int8"])),
        st.tuples(st.sampled_from(["-q", "--no-overwrite", "--bogus", "--steps"]), st.just(None)),
    )
    return st.lists(flag_values, max_size=7).map(lambda pairs: [x for pair in pairs for x in pair if x is not None])


def check_outcome(code: int, capsys, folder: Path, kind: str) -> None:
    """Exit 0 with an output, or exit 2 with one line on stderr and no output."""
    CASES[f"{kind} exit {code}"] += 1
    err = capsys.readouterr().err
    written = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("input")]
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("negprompt: error: "), err
        assert not written, written
    else:
        assert written, err


@FUZZ
@given(data=st.data())
def test_generate_with_random_arguments(data, capsys, tiny_sd_dir):
    model = data.draw(st.sampled_from(["shapes", str(tiny_sd_dir)]), label="model")
    words = SHAPES_WORDS if model == "shapes" else ["a", "photo", "of", "cat", "glasses", "woman"]
    prompt = data.draw(prompts(words), label="prompt")
    options = data.draw(option_lists(words), label="options")
    if not any(flag == "--steps" for flag in options):
        options += ["--steps", "2"]
    if not any(flag in ("--size", "--width", "--height") for flag in options):
        options += ["--size", "32"]
    folder = Path(tempfile.mkdtemp())
    try:
        argv = ["generate", prompt, "--model", model, *options, "-q", "--out", str(folder / "out.png")]
        check_outcome(main(argv), capsys, folder, "generate")
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def recorded_png(tmp_path_factory, tiny_sd_dir):
    folder = tmp_path_factory.mktemp("fuzz-png")
    argv = ["generate", "a photo of a cat", "-n", "glasses", "--model", str(tiny_sd_dir), "--steps", "2"]
    assert main(argv + ["--size", "32", "--seed", "0,1", "-q", "--out", str(folder / "cat.png")]) == 0
    return folder / "cat-s1.png"


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def mutate(record: dict, data) -> dict:
    """Replaces a few fields anywhere in the PNG's JSON record by random values, or drops them."""
    record = json.loads(json.dumps(record))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        node, path = record, []
        while isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)), label="field")
            path.append(key)
            if not isinstance(node[key], dict) or data.draw(st.booleans(), label="stop here"):
                if data.draw(st.integers(0, 4), label="drop?") == 0:
                    del node[key]
                else:
                    node[key] = data.draw(JSON_VALUES, label="value of " + ".".join(path))
                break
            node = node[key]
    return record


@FUZZ
@given(data=st.data())
def test_from_png_with_random_metadata(data, capsys, recorded_png):
    image = Image.open(recorded_png)
    record = json.loads(image.text["negprompt"])
    folder = Path(tempfile.mkdtemp())
    try:
        changed = mutate(record, data)
        steps = changed.get("settings", {}).get("steps") if isinstance(changed.get("settings"), dict) else None
        if isinstance(steps, int) and steps > 3:  # keep runs short: the steps bound is tested elsewhere
            changed["settings"]["steps"] = 3
        info = PngImagePlugin.PngInfo()
        info.add_text("negprompt", json.dumps(changed))
        source = folder / "input.png"
        image.save(source, pnginfo=info)
        code = main(["generate", "--from-png", str(source), "-q", "--out", str(folder / "out" / "again.png")])
        check_outcome(code, capsys, folder, "from-png")
    finally:
        shutil.rmtree(folder)


SPEC_FIELDS = {
    "name": ["fuzz", "''", "[1]"],
    "model": ["shapes", "[", "no-such-model"],
    "scheduler": ["ddim", "x", "3"],
    "steps": ["2", "0", "many", "1001", "2.5"],
    "scale": ["7.5", ".nan", "-1e9", "x"],
    "size": ["32", "33", "0", "x"],
    "map_size": ["8", "0", "x"],
    "seeds": ["[0]", "[0, 0]", "[]", "3", "[x]", "[-1]", "[18446744073709551616]"],
    "pairs": [
        "\n  - {prompt: a red circle with a hat, negative: a hat}",
        "\n  - {prompt: a red circle, negative: 'hat, sun.'}",
        "\n  - {prompt: a red circle, negative: a hat, word: sun}",
        "\n  - {prompt: a red circle, negative: a hat, word: hat, group: noun}",
        "\n  - {prompt: a red circle, negative: zebra}",
        "\n  - {prompt: a red circle}",
        "\n  - [1, 2]",
        " []",
    ],
    "unknown": ["1"],
}


@st.composite
def study_specs(draw) -> str:
    """A small study spec: each field valid (first choice) most of the time, else another value or absent."""
    lines = []
    for field, choices in SPEC_FIELDS.items():
        if field == "unknown":
            if draw(st.integers(0, 9)) == 0:
                lines.append("unknown: 1")
            continue
        pick = draw(st.integers(0, 12))
        if pick == 0:
            continue  # absent
        value = choices[0] if pick > 4 else draw(st.sampled_from(choices))
        lines.append(f"{field}: {value}")
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["{{", "- a list", "model: ["])))
    return "\n".join(lines)


@FUZZ
@given(text=study_specs())
def test_study_with_random_specs(text, capsys):
    folder = Path(tempfile.mkdtemp())
    try:
        spec = folder / "input.yaml"
        spec.write_text(text)
        code = main(["study", str(spec), "-q", "--out", str(folder / "results")])
        check_outcome(code, capsys, folder, "study")
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(data=st.data())
def test_run_spec_from_mutated_json_raises_only_settings_errors(data):
    """RunSpec.from_json (what PNGs, studies and the API read) on a valid record with random fields
    replaced or dropped: a RunSpec or a NegpromptError, never another exception."""
    from negprompt.errors import NegpromptError
    from negprompt.guidance.plan import Guidance, Term
    from negprompt.runspec import RunSpec

    guidance = Guidance(rule="dual", positive=Term("a red circle"), negatives=(Term("a hat", 3.0),))
    valid = RunSpec(guidance, steps=2, height=32, width=32).to_json()
    try:
        RunSpec.from_json(mutate(valid, data))
        CASES["RunSpec.from_json accepted"] += 1
    except NegpromptError:
        CASES["RunSpec.from_json refused"] += 1
