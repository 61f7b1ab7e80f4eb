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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from negprompt.analysis.attention_stats import reduce_layer
from negprompt.analysis.spec import Pair, SpecError, StudySpec, check_vocabulary
from negprompt.analysis.strength import strength_curves
from negprompt.attention.capture import CaptureRequest
from negprompt.attention.result import capture, plan_for
from negprompt.attention.tokens import tokenize_words
from negprompt.files import append_text, is_temporary, write_json, write_text
from negprompt.jobs import ONE_PROCESS, SHARDS_FOLDER, Job, Workers
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
    if spec_path.exists():
        recorded = json.loads(spec_path.read_text())
        if recorded.get("fingerprint") != spec.fingerprint():
            raise SpecError(
                f"{out_dir} holds results of another spec ({recorded.get('spec', {}).get('name')!r}, "
                f"fingerprint {recorded.get('fingerprint')}); use a new --out folder"
            )
        return
    # A temporary spec.json left by a kill is ours.
    if out_dir.exists() and any(not is_temporary(path, spec_path) for path in out_dir.iterdir()):
        raise SpecError(f"{out_dir} is not empty and holds no study; use a new or empty --out folder")
    write_json(spec_path, {"fingerprint": spec.fingerprint(), "spec": spec.to_json()}, indent=2)


def completed_pairs(spec: StudySpec, out_dir: Path, steps_per_run: int) -> set[int]:
    """Indices of pairs whose rows are all in the results; drops a torn tail and partial pairs."""
    path = out_dir / RESULTS_FILE
    if not path.exists():
        return set()
    text = path.read_text()
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
    for row in csv.reader(lines[1:]):
        if len(row) == len(COLUMNS):
            counts[int(row[0])] = counts.get(int(row[0]), 0) + 1
    done = {pair for pair, count in counts.items() if count == expected}
    kept = [lines[0]] + [
        line for line in lines[1:] if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) in done
    ]
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


def run_pair(spec: StudySpec, index: int, pair: Pair, session: Session) -> tuple[list[tuple], int]:
    """Captures one pair over all seeds (one batched run) and returns its result rows."""
    settings, request = pair_run(spec, pair, session)
    result = capture(settings, request, session, trace=False, reducer=reduce_layer)
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
        total=len(spec.pairs) * len(spec.seeds), initial=len(done) * len(spec.seeds), unit="img", disable=not progress
    )
    for index, pair in todo:
        rows, unet_rows = run_pair(spec, index, pair, session)
        _append(out_dir / RESULTS_FILE, rows)
        rows_evaluated += unet_rows
        bar.update(len(spec.seeds))
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

    def compute(index: int) -> str:
        nonlocal rows_evaluated
        rows, unet_rows = run_pair(spec, index, spec.pairs[index], session)
        rows_evaluated += unet_rows
        if on_pair_done is not None:
            on_pair_done(index)
        return _csv_text(rows)

    payloads = study_job(spec, out_dir, workers).run(compute, progress)
    if payloads is not None:
        finish_study(out_dir, payloads)
    return StudyProgress(len(spec.pairs), len(spec.pairs), time.monotonic() - started, rows_evaluated)
