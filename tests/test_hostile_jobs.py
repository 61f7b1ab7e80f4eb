"""Hostile job folders and study tables (issue 33, in part).

Every hostile input is made here, from a good one: a shard whose unit payload has the wrong type, a shard
that is a folder or not UTF-8, a results table with NaN or 1e308, a study folder edited by hand. Each ends in
one line and exit code 2, with no traceback, nothing good replaced and nothing left behind. The study jobs are
built without the model (their rows are made up in the format the study writes), so only the refusals run.
Hostile training checkpoints, output paths and temporaries left by a kill are in test_hostile_checkpoints.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import assert_usage_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from negprompt.analysis.spec import parse_spec
from negprompt.analysis.study import (
    COLUMNS,
    DEFINITIONS,
    RESULTS_FILE,
    check_study_payload,
    finish_study,
    prepare_directory,
    study_job,
)
from negprompt.interfaces.cli import main
from negprompt.jobs import ONE_PROCESS, Job

SPEC = """\
name: hostile
model: shapes
steps: 2
seeds: [0, 1]
pairs:
  - {group: noun, prompt: a red circle, negative: a hat}
  - {group: adjective, prompt: a blue square, negative: striped}
  - {group: noun, prompt: a green triangle, negative: a sun}
"""
STEPS = 2  # UNet calls of each pair's rows


def pair_rows(spec, index: int) -> str:
    """The CSV text of pair ``index`` in the study's format (made-up r_t values, positive and finite)."""
    pair, buffer = spec.pairs[index], io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for seed in spec.seeds:
        for step in range(STEPS):
            for number, definition in enumerate(DEFINITIONS):
                value = 0.5 + 0.1 * index + 0.05 * step + 0.01 * seed + 0.001 * number
                timestep = 999 - 500 * step
                row = (index, pair.group, pair.prompt, pair.negative, pair.word, "red", seed, step, timestep)
                writer.writerow((*row, definition, f"{value:.6g}"))
    return buffer.getvalue()


def study_folder(folder: Path) -> Path:
    """A finished sharded study in ``folder``: spec.json, job.json, one shard, results.csv."""
    spec = parse_spec(SPEC)
    prepare_directory(spec, folder)
    payloads = study_job(spec, folder).run(lambda u: pair_rows(spec, u), progress=False, check=check_study_payload)
    finish_study(folder, payloads)
    return folder


def shard_of(folder: Path) -> Path:
    return folder / "shards" / "process-0-of-1.jsonl"


def set_line(folder: Path, number: int, text: bytes) -> None:
    """Replaces line ``number`` (1: the header) of the folder's shard."""
    lines = shard_of(folder).read_bytes().split(b"\n")
    lines[number - 1] = text
    shard_of(folder).write_bytes(b"\n".join(lines))


def with_payload(value) -> callable:
    return lambda folder: set_line(folder, 2, json.dumps({"unit": 0, "payload": value}).encode())


def with_unit(value) -> callable:
    def edit(folder: Path) -> None:
        record = json.loads(shard_of(folder).read_bytes().split(b"\n")[1])
        set_line(folder, 2, json.dumps({"unit": value, "payload": record["payload"]}).encode())

    return edit


def another_pairs_rows(folder: Path) -> None:
    """Unit 0's line holding unit 1's rows: valid JSON, valid CSV, the wrong pair."""
    record = json.loads(shard_of(folder).read_bytes().split(b"\n")[2])
    with_payload(record["payload"])(folder)


def job_json(edit) -> callable:
    def change(folder: Path) -> None:
        record = json.loads((folder / "job.json").read_text())
        (folder / "job.json").write_text(json.dumps(edit(record)))

    return change


def replace_with_folder(name: str) -> callable:
    def change(folder: Path) -> None:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir()

    return change


HOSTILE_SHARDS = {
    "payload a list": (with_payload([1, 2, 3]), "not the CSV text of pair 0's rows (it is a list)"),
    "payload a number": (with_payload(5), "it is a number"),
    "payload null": (with_payload(None), "it is null"),
    "payload an object": (with_payload({"rows": "x"}), "it is an object"),
    "payload text without rows": (with_payload("garbage"), "does not end in a newline"),
    "payload of another pair": (another_pairs_rows, "is not a row of pair 0"),
    "payload missing a step": (
        lambda f: with_payload("".join(pair_rows(parse_spec(SPEC), 0).splitlines(True)[:-2]))(f),
        "pair 0 is not whole",
    ),
    "payload with a NUL": (
        lambda f: with_payload(pair_rows(parse_spec(SPEC), 0).replace("red", "r\x00d", 1))(f),
        "unit 0 is not what this command writes",
    ),
    "unit line not UTF-8": (lambda f: set_line(f, 2, b'{"unit": 0, "payload": "\xff\xfe"}'), "not a whole unit"),
    "unit line nested 100 000 deep": (
        lambda f: set_line(f, 2, b'{"unit": 0, "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "not a whole unit",
    ),
    "unit line a list": (lambda f: set_line(f, 2, b"[0, 1]"), "not a whole unit"),
    "unit true": (with_unit(True), "is not a unit number"),
    "unit -1": (with_unit(-1), "is not a unit number"),
    "unit 2.5": (with_unit(2.5), "is not a unit number"),
    "unit beyond the job": (with_unit(7), "unit 7 of a job of 3 units"),
    "header not UTF-8": (lambda f: set_line(f, 1, b"\xff\xfe"), "is not a shard of negprompt"),
    "header a list": (lambda f: set_line(f, 1, b"[1]"), "is not a shard of negprompt"),
    "header of another job": (lambda f: set_line(f, 1, b'{"job": "0123456789abcdef"}'), "holds units of another job"),
    "a shard that is a folder": (
        lambda f: (f / "shards" / "process-1-of-2.jsonl").mkdir(),
        "is not a shard file (a folder",
    ),
    "shards/ a file": (lambda f: (shutil.rmtree(f / "shards"), (f / "shards").write_text("x")), "is not a folder"),
    "job.json not UTF-8": (lambda f: (f / "job.json").write_bytes(b"\xff\xfe{}"), "job.json is not UTF-8 text"),
    "job.json a folder": (replace_with_folder("job.json"), "job.json is not a file"),
    "job.json a list": (lambda f: (f / "job.json").write_text("[1, 2]"), "is not a job record of negprompt"),
    "job.json units a number": (job_json(lambda r: {**r, "units": 5}), "units a list of whole numbers"),
    "job.json settings edited": (
        job_json(lambda r: {**r, "settings": {"spec": {**r["settings"]["spec"], "steps": 3}}}),
        "was edited",
    ),
}


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (shards and logs aside: the hostile edits are there), with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.parts[len(folder.parts)] not in ("shards", "logs")
    }


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def good_study(tmp_path_factory) -> Path:
    return study_folder(tmp_path_factory.mktemp("study") / "good")


def test_a_good_study_job_merges_and_says_it_replaced_the_table(good_study, tmp_path, capsys):
    folder = tmp_path / "job"
    shutil.copytree(good_study, folder)
    before = (folder / RESULTS_FILE).read_bytes()
    assert main(["merge", str(folder)]) == 0
    assert capsys.readouterr().out == f"replaced {folder / RESULTS_FILE}\n"
    assert (folder / RESULTS_FILE).read_bytes() == before


@pytest.mark.parametrize("case", sorted(HOSTILE_SHARDS))
def test_merge_refuses_a_damaged_job_before_replacing_anything(case, good_study, tmp_path, capsys):
    folder = tmp_path / "job"
    shutil.copytree(good_study, folder)
    edit, message = HOSTILE_SHARDS[case]
    edit(folder)
    before = folder_state(folder)
    assert_usage_error(main(["merge", str(folder)]), capsys, message)
    assert folder_state(folder) == before  # results.csv untouched, nothing new
    assert no_temporaries(folder)


def test_a_rerun_of_the_study_refuses_a_damaged_shard_before_any_work(good_study, tmp_path, capsys):
    """The study's own run reads its shards back through the same check (here: before computing)."""
    folder = tmp_path / "job"
    shutil.copytree(good_study, folder)
    with_payload(17)(folder)
    spec = parse_spec(SPEC)
    computed = []
    from negprompt.jobs import JobError

    with pytest.raises(JobError, match="unit 0 is not what this command writes"):
        study_job(spec, folder).run(computed.append, progress=False, check=check_study_payload)
    assert computed == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=12,
    ),
    unit=st.integers(min_value=-2, max_value=4) | st.booleans() | st.floats(allow_nan=False),
)
def test_merge_of_random_shard_lines(payload, unit, good_study, tmp_path_factory):
    """Any JSON value as a unit's payload or number: a one-line refusal, and results.csv untouched."""
    folder = tmp_path_factory.mktemp("fuzz") / "job"
    shutil.copytree(good_study, folder)
    set_line(folder, 2, json.dumps({"unit": unit, "payload": payload}).encode())
    before = folder_state(folder)
    stderr = io.StringIO()
    real = sys.stderr
    sys.stderr = stderr
    try:
        code = main(["merge", str(folder)])
    finally:
        sys.stderr = real
    err = stderr.getvalue().strip()
    assert code == 2 and err.startswith("negprompt: error: ") and len(err.splitlines()) == 1, err
    assert folder_state(folder) == before


# ---------------------------------------------------------------- the other sharded commands


def shapes_job(folder: Path, command: str, settings: dict, sizes: list[int], payload) -> Path:
    """A finished job of a shapes command with made-up payloads (``payload(unit)``), as its processes write."""
    identity = {"model": "shapes", "dtype": "float32", "device": "cpu"}
    Job(folder, command, {**settings, **identity}, sizes, ONE_PROCESS).run(payload, progress=False)
    return folder


def evaluation_payload(size: int) -> dict:
    from negprompt.shapes.evaluation import ATTRIBUTES

    read = dict.fromkeys(ATTRIBUTES, True)
    return {"reads": [read] * size, "settings": {"steps": 3, "scheduler": "euler-a", "scale": 5.0}}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"reads": "all", "settings": {}}, "payload['reads'] is text, not a list"),
        ({"reads": [{"color": 1}], "settings": {}}, "has other keys than"),
        (
            {"reads": [], "settings": {"steps": 3, "scheduler": "euler-a", "scale": 5.0}},
            "0 reads, not 1",
        ),
        ([1, 2], "payload is a list, not an object"),
    ],
)
def test_evaluate_merge_refuses_payloads_of_the_wrong_shape(bad, message, tmp_path, capsys):
    from negprompt.shapes.evaluation import ROWS, evaluation_units

    units = evaluation_units(1)
    settings = {"images": 1, "steps": 3, "scheduler": None, "scale": None, "batches": [list(u) for u in units]}
    folder = shapes_job(
        tmp_path / "ev", "evaluate", settings, [1] * len(units), lambda u: bad if u == 0 else evaluation_payload(1)
    )
    assert len(units) == len(ROWS)
    assert_usage_error(main(["merge", str(folder)]), capsys, message, folder / "evaluation.md")


def test_bench_and_sweep_merges_refuse_payloads_of_the_wrong_shape(tmp_path, capsys):
    from negprompt.analysis.sweep import SweepSettings
    from negprompt.shapes.methods import BenchSettings

    bench = BenchSettings(("a hat",), images=2)
    folder = shapes_job(
        tmp_path / "bench", "bench-methods", {"bench": bench.to_json(), "shown_model": "shapes"}, [2], lambda u: 5
    )
    assert_usage_error(main(["merge", str(folder)]), capsys, "payload is a number, not an object")
    sweep = SweepSettings((("a red circle", "a hat"),), (0,), (0, 2), (3,), 6)
    row = {"prompt": "a red circle", "negative": "a hat", "word": "hat", "seed": 0, "plain_present": True}
    rows = [{**row, "variant": "none", "start": -1, "present": "yes", "ssim_outside": 1.0}]
    folder = shapes_job(tmp_path / "sweep", "edit-sweep", {"sweep": sweep.to_json()}, [1], lambda u: rows)
    assert_usage_error(main(["merge", str(folder)]), capsys, "payload[0]", folder / "sweep.csv")


# ---------------------------------------------------------------- report


def hostile_value(value: str, line: int = 4) -> callable:
    def edit(folder: Path) -> None:
        lines = (folder / RESULTS_FILE).read_text().splitlines(keepends=True)
        fields = lines[line - 1].rstrip("\n").split(",")
        fields[-1] = value
        lines[line - 1] = ",".join(fields) + "\n"
        (folder / RESULTS_FILE).write_text("".join(lines))

    return edit


def every_value(value: str) -> callable:
    def edit(folder: Path) -> None:
        lines = (folder / RESULTS_FILE).read_text().splitlines()
        rows = [lines[0]] + [",".join(line.split(",")[:-1] + [value]) for line in lines[1:]]
        (folder / RESULTS_FILE).write_text("\n".join(rows) + "\n")

    return edit


HOSTILE_TABLES = {
    "one NaN": (hostile_value("nan"), "line 4: r_t 'nan' is not a number from 0 to 1e+06"),
    "all NaN": (every_value("nan"), "line 2: r_t 'nan'"),
    "1e308 in the last pair": (hostile_value("1e308", line=25), "line 25: r_t '1e308'"),
    "inf": (hostile_value("inf"), "r_t 'inf'"),
    "negative": (hostile_value("-3"), "r_t '-3'"),
    "text": (hostile_value("abc"), "r_t 'abc' is not a number"),
    "not UTF-8": (lambda f: (f / RESULTS_FILE).write_bytes(b"\xff" + (f / RESULTS_FILE).read_bytes()), "not UTF-8"),
    "random bytes": (lambda f: (f / RESULTS_FILE).write_bytes(os.urandom(2000)), "results.csv"),
    "another header": (lambda f: (f / RESULTS_FILE).write_text("a,b,c\n1,2,3\n"), "is not a results table"),
    "short rows": (lambda f: (f / RESULTS_FILE).write_text(",".join(COLUMNS) + "\n1,2\n"), "has 2 columns"),
    "a step that is text": (
        lambda f: (f / RESULTS_FILE).write_text((f / RESULTS_FILE).read_text().replace(",0,999,", ",x,999,", 1)),
        "step 'x' is not a step number",
    ),
    "a step far beyond the others": (
        lambda f: (f / RESULTS_FILE).write_text((f / RESULTS_FILE).read_text().replace(",0,999,", ",9999,999,", 1)),
        "is not whole",
    ),
    "another r_t, still a number": (hostile_value("0.5", line=2), None),  # the control: a report is written
    "results.csv a folder": (replace_with_folder(RESULTS_FILE), "results.csv is not a file"),
    "spec.json not UTF-8": (lambda f: (f / "spec.json").write_bytes(b"\xff"), "spec.json is not the JSON"),
    "spec.json a list": (lambda f: (f / "spec.json").write_text("[1]"), "holds no study spec"),
    "spec.json without pairs": (
        lambda f: (f / "spec.json").write_text(json.dumps({"spec": {"name": "x", "steps": 2}})),
        "holds no study spec",
    ),
    "report.md a folder": (lambda f: (f / "report.md").mkdir(), "report.md: it is a folder"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TABLES))
def test_report_refuses_a_damaged_table_before_writing_any_file(case, good_study, tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("spec.json", RESULTS_FILE):
        shutil.copy(good_study / name, folder / name)
    edit, message = HOSTILE_TABLES[case]
    edit(folder)
    before = sorted(p.name for p in folder.iterdir())
    code = main(["report", str(folder)])
    if message is None:
        assert code == 0, capsys.readouterr().err
        return
    assert_usage_error(code, capsys, message)
    assert sorted(p.name for p in folder.iterdir()) == before  # no PNG, no report, no temporary


def test_a_report_written_again_says_replaced(good_study, tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("spec.json", RESULTS_FILE):
        shutil.copy(good_study / name, folder / name)
    assert main(["report", str(folder)]) == 0
    assert all(line.startswith("wrote ") for line in capsys.readouterr().out.splitlines())
    assert main(["report", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(line.startswith("replaced ") for line in lines), lines  # report.md, 4 figures


STUDY_FOLDERS = {
    "a row whose pair is text": (
        lambda f: (f / RESULTS_FILE).write_text((f / RESULTS_FILE).read_text().replace("\n0,", "\nx,", 1)),
        "line 2: pair 'x' is not a pair number",
    ),
    "results.csv not UTF-8": (
        lambda f: (f / RESULTS_FILE).write_bytes((f / RESULTS_FILE).read_bytes() + b"\xff\xfe\n"),
        "results.csv is not UTF-8 text",
    ),
    "spec.json a list": (lambda f: (f / "spec.json").write_text("[1]"), "is not the spec record a study writes"),
    "spec.json not UTF-8": (lambda f: (f / "spec.json").write_bytes(b"\xff"), "is not the spec record"),
    "spec.json a folder": (replace_with_folder("spec.json"), "is not the spec record"),
}


@pytest.mark.parametrize("case", sorted(STUDY_FOLDERS))
def test_a_study_resume_refuses_a_damaged_folder_and_changes_nothing(case, good_study, tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("spec.json", RESULTS_FILE):
        shutil.copy(good_study / name, folder / name)
    spec = tmp_path / "hostile.yaml"
    spec.write_text(SPEC)
    edit, message = STUDY_FOLDERS[case]
    edit(folder)
    before = folder_state(folder)
    assert_usage_error(main(["study", str(spec), "--out", str(folder), "-q"]), capsys, message)
    assert folder_state(folder) == before and no_temporaries(folder)
