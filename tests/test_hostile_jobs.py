"""Hostile job folders, study tables and training checkpoints (issue 33: items 2, 7, 8 and 10 in part).

Every hostile input is made here, from a good one: a shard whose unit payload has the wrong type, a shard
that is a folder or not UTF-8, a results table with NaN or 1e308, a truncated, pickled or foreign
checkpoint, an output through a loop of symbolic links. Each ends in one line and exit code 2 (or
``failed:`` and 1 for a full disk), with no traceback, nothing good replaced and nothing left behind.
The study jobs are built without the model (their rows are made up in the format the study writes),
so only the refusals run; the training tests build the bundled architecture but train one step or none.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
from negprompt.files import write_atomically
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


# ---------------------------------------------------------------- training checkpoints


TRAIN = ["--samples", "16", "--batch-size", "8", "-q"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint at step 0 of what ``train --out X --samples 16 --batch-size 8`` trains, and a log line."""
    from negprompt.shapes.training import LOG_FILE, TrainConfig, Trainer

    folder = tmp_path_factory.mktemp("train") / "run"
    Trainer(TrainConfig(samples=16, batch_size=8), folder).save_checkpoint()
    (folder / LOG_FILE).write_text('{"step": 0, "note": "before"}\n')
    return folder


def damaged(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)


def state_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "state.safetensors"))


def save_tensors(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "state.safetensors"))


def nan_in(tensors: dict, key: str) -> dict:
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


def edit_meta(edit) -> callable:
    def change(folder: Path) -> None:
        meta = json.loads((folder / "state.json").read_text())
        edit(meta)
        (folder / "state.json").write_text(json.dumps(meta))

    return change


HOSTILE_CHECKPOINTS = {
    "state truncated": (
        lambda f: damaged(f, "state.safetensors", (f / "state.safetensors").read_bytes()[:1000]),
        "state.safetensors is not a safetensors checkpoint",
    ),
    "state empty": (lambda f: damaged(f, "state.safetensors", b""), "is not a safetensors checkpoint"),
    "state a pickle": (
        lambda f: torch.save({"model.unet.conv_in.weight": torch.zeros(2)}, f / "state.safetensors"),
        "is not a safetensors checkpoint",
    ),
    "state of another program": (
        lambda f: save_tensors(f, {"weight": torch.zeros(2, 2)}),
        "is not a checkpoint of this model: ",
    ),
    "state with a wrong shape": (
        lambda f: save_tensors(f, {**state_tensors(f), "model.unet.conv_in.bias": torch.zeros(3)}),
        "model.unet.conv_in.bias has shape (3,)",
    ),
    "state without its RNG": (
        lambda f: save_tensors(f, {k: v for k, v in state_tensors(f).items() if k != "rng.torch"}),
        "tensors missing (first rng.torch)",
    ),
    "state with NaN weights": (
        lambda f: save_tensors(f, nan_in(state_tensors(f), "ema.unet.conv_in.bias")),
        "ema.unet.conv_in.bias holds values that are not finite",
    ),
    "state missing": (lambda f: (f / "state.safetensors").unlink(), "holds state.json but no state.safetensors"),
    "state a folder": (replace_with_folder("state.safetensors"), "state.safetensors is a folder"),
    "meta not UTF-8": (lambda f: damaged(f, "state.json", b"\xff\xfe"), "state.json is not the JSON training writes"),
    "meta a list": (lambda f: damaged(f, "state.json", b"[1]"), "holds no step number"),
    "meta step text": (edit_meta(lambda m: m.update(step="7")), "holds no step number"),
    "meta step a fraction": (edit_meta(lambda m: m.update(step=1.5)), "holds no step number"),
    "meta step beyond the run": (edit_meta(lambda m: m.update(step=10**30)), "is beyond its run's 2 steps"),
    "meta config a list": (edit_meta(lambda m: m.update(config=[1])), "holds no training config"),
    "meta config with an unknown field": (
        edit_meta(lambda m: m["config"].update(bogus=1)),
        "its config is not a training config",
    ),
    "meta samples text": (edit_meta(lambda m: m["config"].update(samples="many")), "not a training config"),
    "meta history text": (edit_meta(lambda m: m.update(history="x")), "holds no training config and history"),
    "meta a folder": (replace_with_folder("state.json"), "state.json is a folder"),
    "log a folder": (replace_with_folder("train_log.jsonl"), "train_log.jsonl is a folder"),
    "model a file": (lambda f: (f / "model").write_text("x"), "is not a folder"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHECKPOINTS))
def test_train_refuses_a_damaged_checkpoint_and_leaves_the_log_alone(case, checkpoint, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(checkpoint, folder)
    edit, message = HOSTILE_CHECKPOINTS[case]
    edit(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    # --lr differs from the checkpoint's: a resume would log "config changed" — never before the check
    assert_usage_error(main(["train", "--out", str(folder), *TRAIN, "--lr", "1e-3"]), capsys, message)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert no_temporaries(folder)


def test_a_good_checkpoint_resumes_and_logs_the_change_after_its_check(checkpoint, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(checkpoint, folder)
    from negprompt.shapes.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(samples=16, batch_size=8, learning_rate=1e-3), folder)
    trainer.load_checkpoint()
    log = (folder / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "config changed" and len(log) == 2


def test_train_on_a_full_disk_fails_in_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    """A full disk in the checkpoint (safetensors reports it as its own error) and in the export:
    ``failed:`` in one line, exit 1, no temporary left; the next run goes on."""
    from safetensors import SafetensorError

    import negprompt.shapes.training as training

    folder = tmp_path / "run"
    real_save, real_export = training.save_file, training.save_components

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(training, "save_file", full)
    assert main(["train", "--out", str(folder), *TRAIN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: failed: No space left on device") and len(err.splitlines()) == 1, err
    assert not (folder / "state.json").exists() and no_temporaries(folder)
    monkeypatch.setattr(training, "save_file", real_save)
    monkeypatch.setattr(training, "save_components", full)
    assert main(["train", "--out", str(folder), *TRAIN]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("negprompt: failed: No space left on device") and len(err.splitlines()) == 1, err
    assert (folder / "state.json").exists() and not (folder / "model").exists() and no_temporaries(folder)
    monkeypatch.setattr(training, "save_components", real_export)
    assert main(["train", "--out", str(folder), *TRAIN]) == 0
    assert "resuming at step 2 of 2" in capsys.readouterr().out
    assert (folder / "model" / "model_index.json").exists() and no_temporaries(folder)


def test_an_interrupted_train_keeps_its_checkpoint_and_resumes(tmp_path):
    """Ctrl-C (SIGINT) ends the step in progress, writes its checkpoint and stops (exit 130); the run says
    its cost before it starts and measured after its first steps."""
    folder = tmp_path / "run"
    argv = [sys.executable, "-m", "negprompt", "train", "--out", str(folder), "--samples", "200", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([*argv, "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = run.stdout.readline()
    assert first.startswith("train: 100 steps of 2 examples to go (200 samples); about "), first
    measured = run.stdout.readline()  # after the first steps: the cost measured on this machine
    assert "s a step over the first 3: about" in measured, measured
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    step = json.loads((folder / "state.json").read_text())["step"]
    assert 3 <= step < 100 and f"stopped at step {step} of 100 with its checkpoint" in out, out
    assert not (folder / "model").exists() and no_temporaries(folder)
    from negprompt.shapes.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(samples=200, batch_size=2), folder)
    trainer.load_checkpoint()  # the whole checkpoint, checked: the same command resumes from it
    assert trainer.step == step


def test_checkpoints_come_every_few_minutes_as_well(tmp_path):
    from test_shapes_model import tiny_config

    from negprompt.shapes.training import Trainer

    saved = []
    trainer = Trainer(tiny_config(samples=32, checkpoint_every=1000), tmp_path)
    trainer.run(progress=False, on_checkpoint=lambda t: saved.append(t.step), checkpoint_seconds=0.0)
    assert saved == [1, 2, 3, 4]  # every step here (0 s apart), and the last
    saved.clear()
    Trainer(tiny_config(samples=32, checkpoint_every=1000), tmp_path / "b").run(
        progress=False, on_checkpoint=lambda t: saved.append(t.step), checkpoint_seconds=None
    )
    assert saved == [4]


def test_an_exported_model_follows_the_umask_and_replaces_the_old_one_whole(tmp_path):
    from test_shapes_model import tiny_config

    from negprompt.shapes.training import Trainer

    trainer = Trainer(tiny_config(samples=8), tmp_path / "run")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old-file").write_text("from an older export")
    mask = os.umask(0o027)
    try:
        folder = trainer.export(tmp_path / "model")
    finally:
        os.umask(mask)
    modes = {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in folder.rglob("*")}
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert len(weights) == 2 and all(modes[name] == 0o640 for name in weights), modes  # safetensors wrote 0600
    assert all(mode == (0o750 if (folder / name).is_dir() else 0o640) for name, mode in modes.items()), modes
    assert folder.stat().st_mode & 0o777 == 0o750
    assert not (folder / "old-file").exists() and no_temporaries(tmp_path)


# ---------------------------------------------------------------- paths


def test_outputs_through_a_loop_of_links_or_too_long_are_user_errors(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    long_name = "x" * 300
    cases = [
        (["generate", "a red circle", "--out", str(tmp_path / "loop" / "x.png")], "loop of symbolic links"),
        (["generate", "a red circle", "--out", str(tmp_path / f"{long_name}.png")], "give a name of at most"),
        (["generate", "a red circle", "--out", str(tmp_path / ("y" * 245 + ".png"))], "less what its temporary adds"),
        (["study", "shapes", "--out", str(tmp_path / "loop" / "s")], "loop of symbolic links"),
        (["train", "--out", str(tmp_path / long_name)], "give a name of at most"),
        (["demo", "--out", str(tmp_path / "loop")], "loop of symbolic links"),
        (["evaluate", "--out", str(tmp_path / "/".join(["d" * 200] * 25))], "the path is"),
        (["merge", str(tmp_path / long_name)], "file name too long"),
        (["report", str(tmp_path / "loop")], "too many levels of symbolic links"),
    ]
    for argv, message in cases:
        assert_usage_error(main(argv), capsys, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# ---------------------------------------------------------------- temporaries left by a kill


def test_a_png_killed_mid_write_leaves_a_temporary_the_next_run_removes(tmp_path, capsys):
    """kill -9 while a PNG is written leaves ``.out.png.XXXXXXXX.tmp``; the next run of the command removes
    it (and only temporaries of its own names that no live writer holds: never another file)."""
    out = tmp_path / "out.png"
    writer = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from negprompt.files import write_atomically\n"
        "def write_one(final, temporary):\n"
        "    temporary.write_bytes(b'half a PNG')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "write_atomically([Path(sys.argv[1])], write_one)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.png.") and left[0].endswith(".tmp"), left
    users = [".out.png.notes.tmp", ".out.png.abcdefgh.tmp.bak", ".other.png.abcdefgh.tmp", "out.png.abcdefgh.tmp"]
    for name in users:
        (tmp_path / name).write_text("the user's")
    live = tmp_path / ".out.png.zz99zz99.tmp"  # another process writing out.png right now
    live.write_text("in progress")
    holder = os.open(live, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert main(["generate", "a red circle", "--steps", "2", "-q", "--out", str(out)]) == 0
    finally:
        os.close(holder)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, live.name, "out.png"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the live writer's lock is gone now: the next write of out.png removes its temporary
    write_atomically([out], lambda final, temporary: temporary.write_bytes(out.read_bytes()))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*users, "out.png"])
