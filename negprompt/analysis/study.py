"""The study runner: every pair × seed, r_t per step under both definitions, resumable.

Results go to ``DIR/results.csv``, one row per (pair, seed, step, definition). A pair's rows are
appended in one write followed by fsync once all its seeds are done, so after Ctrl-C, kill -9 or a
power loss the file holds whole pairs plus at most one torn tail, which the next run drops before
going on with the first missing pair. ``DIR/spec.json`` records the spec; a directory made for
another spec is refused and left untouched.

Launched as several processes (``accelerate launch``, docs/distributed.md), each process computes its
share of the pairs into its own shard (:mod:`negprompt.jobs`) and the main process writes
``results.csv`` from them at the end: byte for byte the one-process file. A folder that holds shards
goes on as a sharded job with any number of processes (``negprompt merge DIR`` writes the file alone).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.analysis.spec import Pair, SpecError, StudySpec, check_vocabulary
from negprompt.analysis.strength import strength_curves
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture, plan_for
from negprompt.attention.tokens import tokenize_words
from negprompt.files import append_text, is_temporary, write_json, write_text
from negprompt.jobs import (
    ONE_PROCESS,
    SHARDS_FOLDER,
    Job,
    PayloadError,
    StepReport,
    UnitBar,
    UnitReport,
    Workers,
    json_kind,
)
from negprompt.models.prompts import check_prompt
from negprompt.runspec import RunSpec
from negprompt.session import Session, as_session

RESULTS_FILE = "results.csv"
SPEC_FILE = "spec.json"
COLUMNS = ("pair", "group", "prompt", "negative", "word", "related", "seed", "step", "timestep", "definition", "r_t")
DEFINITIONS = ("article", "released")


@dataclass
class StudyProgress:
    pairs_done: int
    pairs_total: int
    seconds: float
    unet_rows: int  # UNet evaluations (branch × image × step) done in this run


def prepare_directory(spec: StudySpec, out_dir: Path) -> None:
    """Creates ``out_dir`` for ``spec`` or checks that it already belongs to it."""
    spec_path = out_dir / SPEC_FILE
    if spec_path.exists() or spec_path.is_symlink():
        try:
            recorded = json.loads(spec_path.read_bytes().decode("utf-8")) if spec_path.is_file() else None
        except (ValueError, RecursionError):
            recorded = None
        if not isinstance(recorded, dict):
            raise SpecError(f"{spec_path} is not the spec record a study writes (a damaged folder); use a new --out")
        if recorded.get("fingerprint") != spec.fingerprint():
            other = recorded.get("spec")
            name = str(other.get("name"))[:40] if isinstance(other, dict) else None
            raise SpecError(
                f"{out_dir} holds results of another spec ({name!r}, fingerprint "
                f"{str(recorded.get('fingerprint'))[:40]}); use a new --out folder"
            )
        return
    # A temporary spec.json left by a kill is ours.
    if out_dir.exists() and any(not is_temporary(path, spec_path) for path in out_dir.iterdir()):
        raise SpecError(f"{out_dir} is not empty and holds no study; use a new or empty --out folder")
    write_json(spec_path, {"fingerprint": spec.fingerprint(), "spec": spec.to_json()}, indent=2)


def pair_number(text: str) -> int | None:
    """The pair number a results row starts with (ASCII digits, at most 9), else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def completed_pairs(spec: StudySpec, out_dir: Path, steps_per_run: int) -> set[int]:
    """Indices of pairs whose rows are all in the results; drops a torn tail and partial pairs."""
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return set()
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path} is not UTF-8 text (byte {error.start}): not a results table of negprompt; use a new --out folder"
        ) from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]  # a write cut short
    if not lines and HEADER.startswith(text):  # cut short before the header was whole (e.g. a full disk)
        path.unlink()
        return set()
    if not lines or lines[0].rstrip("\n") != ",".join(COLUMNS):
        raise SpecError(f"{path} is not a results table of negprompt (header differs)")
    expected = len(spec.seeds) * steps_per_run * len(DEFINITIONS)
    counts: dict[int, int] = {}
    try:
        rows = list(csv.reader(lines[1:]))
    except csv.Error as error:
        raise SpecError(f"{path} cannot be read as CSV ({error}); use a new --out folder") from None
    for number, row in enumerate(rows, 2):
        if len(row) == len(COLUMNS):
            if pair_number(row[0]) is None:
                raise SpecError(
                    f"{path}, line {number}: pair {row[0][:20]!r} is not a pair number (a damaged table); "
                    "delete the line to redo its pair, or use a new --out folder"
                )
            counts[int(row[0])] = counts.get(int(row[0]), 0) + 1
    done = {pair for pair, count in counts.items() if count == expected}
    kept = [lines[0]] + [line for line in lines[1:] if pair_number(line.split(",", 1)[0]) in done]
    if len(kept) != len(text.splitlines(keepends=True)):
        write_text(path, "".join(kept))
    return done


def _csv_text(rows: list[tuple]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


HEADER = _csv_text([COLUMNS])


def _append(path: Path, rows: list[tuple]) -> None:
    append_text(path, ("" if path.exists() else HEADER) + _csv_text(rows))


def pair_run(spec: StudySpec, pair: Pair, session: Session) -> tuple[RunSpec, CaptureRequest]:
    """The run specification of one pair (every seed in one batch, the spec's rule) and what to capture."""
    settings = session.spec_from(spec.run_settings(pair))
    positive_words = list(dict.fromkeys(tokenize_words(session.components.tokenizer, pair.prompt).words))
    request = CaptureRequest(words={"positive": positive_words, "negative": [pair.word]}, size=spec.map_size)
    return settings, request


def check_study(spec: StudySpec, session: Session) -> None:
    """Builds and checks every pair's run and capture plan, so that a bad pair fails before any work."""
    tokenizer = session.components.tokenizer
    check_vocabulary(spec, tokenizer)
    for pair in spec.pairs:
        for text in (pair.prompt, pair.negative):
            check_prompt(tokenizer, text)
        settings, request = pair_run(spec, pair, session)
        plan_for(settings, request, session)


def run_pair(
    spec: StudySpec, index: int, pair: Pair, session: Session, report: UnitReport | None = None
) -> tuple[list[tuple], int]:
    """Captures one pair over all seeds (one batched run) and returns its result rows."""
    settings, request = pair_run(spec, pair, session)
    steps = None if report is None else StepReport(report, label=f"pair {index}, {pair.prompt!r} − {pair.negative!r}: ")
    result = capture(settings, request, session, trace=False, reducer=reduce_layer, callback=steps)
    curves = strength_curves(result, pair.word, pair.related)
    timesteps = result.index["timesteps"]
    rows = []
    for b, seed in enumerate(spec.seeds):
        for s, step in enumerate(result.index["steps"]):
            for definition in DEFINITIONS:
                value = float(curves[definition][s, b])
                rows.append(
                    (
                        index,
                        pair.group,
                        pair.prompt,
                        pair.negative,
                        pair.word,
                        curves["related"][b],
                        seed,
                        step,
                        timesteps[s],
                        definition,
                        f"{value:.6g}",
                    )
                )
    return rows, result.generation.unet_batch_rows


def check_pair_rows(
    rows: Sequence[tuple[int, list[str]]], index: int, pair: Mapping[str, Any], seeds: Sequence[int]
) -> int:
    """Raises ValueError naming the first wrong row unless ``rows`` ((line, fields) pairs) are the whole rows
    of pair ``index`` (``pair``: its spec entry as JSON) over ``seeds``: every column, each (seed, definition)
    once per step 0…S−1. Returns S, the pair's UNet calls. ``r_t`` must be a number (NaN or ±inf pass here:
    the report refuses them, with their line)."""
    identity = [str(index), str(pair["group"]), str(pair["prompt"]), str(pair["negative"]), str(pair["word"])]
    seen: dict[tuple[str, str], list[int]] = {}
    wanted_seeds = {str(seed) for seed in seeds}
    for line, fields in rows:
        where = f"line {line}"
        if len(fields) != len(COLUMNS):
            raise ValueError(f"{where} has {len(fields)} columns, not the {len(COLUMNS)} of {','.join(COLUMNS)}")
        if fields[:5] != identity:
            raise ValueError(f"{where} is not a row of pair {index} ({pair['prompt']!r} → {pair['negative']!r})")
        seed, step, timestep, definition, value = fields[6], fields[7], fields[8], fields[9], fields[10]
        if seed not in wanted_seeds:
            raise ValueError(f"{where}: seed {seed[:20]!r} is not one of the study's seeds")
        if not (step.isascii() and step.isdigit()) or len(step) > 6:
            raise ValueError(f"{where}: step {step[:20]!r} is not a step number")
        if definition not in DEFINITIONS:
            raise ValueError(f"{where}: definition {definition[:20]!r} is not one of {', '.join(DEFINITIONS)}")
        for name, text in (("timestep", timestep), ("r_t", value)):
            try:
                float(text)
            except ValueError:
                raise ValueError(f"{where}: {name} {text[:20]!r} is not a number") from None
        seen.setdefault((seed, definition), []).append(int(step))
    if not seen:
        raise ValueError(f"no rows of pair {index}")
    count = len(next(iter(seen.values())))
    if len(seen) != len(wanted_seeds) * len(DEFINITIONS):
        raise ValueError(
            f"pair {index} is not whole: it has rows of {len(seen)} (seed, definition) pairs, not {len(wanted_seeds) * len(DEFINITIONS)}"
        )
    for (seed, definition), found in seen.items():
        if sorted(found) != list(range(count)):
            raise ValueError(
                f"pair {index} is not whole: each seed and definition needs one row per step 0…{count - 1} "
                f"(seed {seed}, {definition}: steps {sorted(found)[:6]})"
            )
    return count


def check_study_payload(record: Mapping[str, Any], unit: int, payload: Any) -> None:
    """The check of a study's unit (:data:`negprompt.jobs.PayloadCheck`): the CSV text of pair ``unit``'s
    whole rows, ending in a newline."""
    spec = record["settings"]["spec"]
    if not isinstance(payload, str):
        raise PayloadError(f"the payload is not the CSV text of pair {unit}'s rows (it is {json_kind(payload)})")
    if not payload.endswith("\n"):
        raise PayloadError(f"the CSV text of pair {unit} does not end in a newline")
    try:
        rows = list(enumerate(csv.reader(payload.splitlines(keepends=True)), 1))
    except csv.Error as error:
        raise PayloadError(f"the CSV text of pair {unit} cannot be read ({error})") from None
    check_pair_rows(rows, unit, spec["pairs"][unit], spec["seeds"])


def study_job(spec: StudySpec, out_dir: Path, workers: Workers = ONE_PROCESS) -> Job:
    """The study as a job of one unit per pair."""
    return Job(out_dir, "study", {"spec": spec.to_json()}, [len(spec.seeds)] * len(spec.pairs), workers)


def finish_study(out_dir: str | Path, payloads: list[str]) -> list[Path]:
    """``results.csv`` from the pairs' rows in pair order (written whole, then renamed)."""
    return [write_text(Path(out_dir) / RESULTS_FILE, HEADER + "".join(payloads))]


def run_study(
    spec: StudySpec,
    out_dir: str | Path,
    progress: bool = True,
    on_pair_done: Callable[[int], None] | None = None,
    session: Session | None = None,
    workers: Workers = ONE_PROCESS,
) -> StudyProgress:
    """Runs the pairs not yet in ``out_dir``'s results; returns what this run (this process) did.

    ``session``: the loaded ``spec.model`` to run on (default: a new session, device auto).
    ``workers``: this process's place when launched as several (:func:`negprompt.jobs.current_workers`)."""
    out_dir = Path(out_dir)
    session = as_session(spec.model if session is None else session)
    check_study(spec, session)
    with workers.main_first():
        prepare_directory(spec, out_dir)
    if workers.count > 1 or (out_dir / SHARDS_FOLDER).exists():
        return _run_sharded(spec, out_dir, progress, on_pair_done, session, workers)
    done = completed_pairs(spec, out_dir, session.denoiser_calls(spec.scheduler, spec.steps))
    todo = [(i, p) for i, p in enumerate(spec.pairs) if i not in done]
    started = time.monotonic()
    rows_evaluated = 0
    bar = tqdm(
        total=len(spec.pairs) * len(spec.seeds),
        initial=len(done) * len(spec.seeds),
        unit="img",
        desc="study",
        dynamic_ncols=True,
        disable=not progress,
    )
    moving = UnitBar(bar)  # moves at every step of a pair's run, not once a pair
    for number, (index, pair) in enumerate(todo, 1):
        moving.begin(len(spec.seeds), f"unit {number} of {len(todo)}")
        rows, unet_rows = run_pair(spec, index, pair, session, moving.report if progress else None)
        moving.end()
        _append(out_dir / RESULTS_FILE, rows)
        rows_evaluated += unet_rows
        if on_pair_done is not None:
            on_pair_done(index)
    bar.close()
    return StudyProgress(len(spec.pairs), len(spec.pairs), time.monotonic() - started, rows_evaluated)


def _run_sharded(
    spec: StudySpec,
    out_dir: Path,
    progress: bool,
    on_pair_done: Callable[[int], None] | None,
    session: Session,
    workers: Workers,
) -> StudyProgress:
    started = time.monotonic()
    rows_evaluated = 0

    job = study_job(spec, out_dir, workers)

    def compute(index: int) -> str:
        nonlocal rows_evaluated
        rows, unet_rows = run_pair(spec, index, spec.pairs[index], session, job.report)
        rows_evaluated += unet_rows
        if on_pair_done is not None:
            on_pair_done(index)
        return _csv_text(rows)

    payloads = job.run(compute, progress, check=check_study_payload)
    if payloads is not None:
        finish_study(out_dir, payloads)
    return StudyProgress(len(spec.pairs), len(spec.pairs), time.monotonic() - started, rows_evaluated)
