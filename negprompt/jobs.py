"""Jobs split between processes: units of work, one shard file per process, a merge equal to one process.

A command's work is a list of independent **units** (a study's pair, a sweep's pair × seed chunk …),
each CPU-seeded, so its result does not depend on which process computes it. Under ``accelerate
launch`` (or torchrun) the units are dealt out by size (largest first, each to the process with the
least work so far; accelerate's process state says which process this is); every process skips its
units already done and appends each finished unit as one JSON line to its own shard, flushed and
fsynced::

    OUT/job.json                      the command, its settings and their fingerprint
    OUT/shards/process-K-of-N.jsonl   {"job": fingerprint}, then {"unit": u, "payload": …} per line
    OUT/logs/process-K.log            what process K did, with times

A process killed at any point leaves whole units plus at most one torn line, which its successor
drops; a relaunch (with any number of processes) computes only the missing units. When every unit is
in, the main process reads all payloads back in unit order and the command writes its outputs from
them, so the result is byte for byte the one-process result (which goes through the same shards).
``negprompt merge OUT`` does that last step alone. Shards of another job are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from negprompt.errors import NegpromptError
from negprompt.files import append_text, drop_torn_line, write_json

JOB_FILE = "job.json"
SHARDS_FOLDER = "shards"
LOGS_FOLDER = "logs"


class JobError(NegpromptError):
    """A job folder that belongs to another job, or shards that cannot be merged."""


@dataclass(frozen=True)
class Workers:
    """This process's place in a job: ``index`` of ``count`` processes (one process: 0 of 1)."""

    index: int = 0
    count: int = 1
    state: Any = field(default=None, repr=False, compare=False)  # accelerate's PartialState, when launched

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. creating the folder), the others after it."""
        if not self.is_main:
            self.wait_for_everyone()
        yield
        if self.is_main:
            self.wait_for_everyone()


ONE_PROCESS = Workers()  # a run without a launcher


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def current_workers(device: str | None = None) -> Workers:
    """Accelerate's process state when launched as several processes, else the only process.

    On CPU (``device`` "cpu", or no CUDA) the processes talk over gloo; with CUDA accelerate gives each
    process its own GPU (``torch.cuda.set_device``), so "cuda" and "auto" mean that GPU."""
    if launched_processes() == 1:
        return ONE_PROCESS
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise JobError(
            "launched as several processes, but accelerate is not installed: pip install accelerate"
        ) from None
    import torch

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return Workers(state.process_index, state.num_processes, state)


def fingerprint_of(command: str, settings: dict, unit_sizes: Sequence[int]) -> str:
    text = json.dumps({"command": command, "settings": settings, "units": list(unit_sizes)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """numpy scalars → Python numbers (exactly), for JSON."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def read_shard(path: Path, fingerprint: str | None) -> dict[int, Any]:
    """The whole units in one shard file (a torn last line is left out); refuses another job's shard."""
    lines = path.read_bytes().split(b"\n")
    lines = lines[:-1]  # after the last newline: empty, or a line torn by a kill
    if not lines:
        return {}
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        raise JobError(f"{path} is not a shard of negprompt (its first line is no JSON)") from None
    if fingerprint is not None and header.get("job") != fingerprint:
        raise JobError(
            f"{path} holds units of another job (fingerprint {header.get('job')}, this job's {fingerprint}); "
            "merge only shards of one command with the same settings, or use a new --out folder"
        )
    units = {}
    for number, line in enumerate(lines[1:], 2):
        try:
            record = json.loads(line)
            units[int(record["unit"])] = record["payload"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise JobError(
                f"{path}, line {number}: not a whole unit (a damaged shard); delete it to redo its units"
            ) from None
    return units


@dataclass
class Job:
    """The units of one command's run in ``out_dir``; ``unit_sizes[u]`` = images of unit u (for progress)."""

    out_dir: Path
    command: str
    settings: dict
    unit_sizes: list[int]
    workers: Workers = ONE_PROCESS

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.command, self.settings, self.unit_sizes)

    def to_json(self) -> dict:
        """What job.json holds."""
        return {
            "command": self.command,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "units": self.unit_sizes,
        }

    def owners(self) -> list[int]:
        """The process of each unit: largest units first, each to the least loaded process (ties: lowest index)."""
        load, owner = [0] * self.workers.count, [0] * len(self.unit_sizes)
        for unit in sorted(range(len(self.unit_sizes)), key=lambda u: (-self.unit_sizes[u], u)):
            process = min(range(self.workers.count), key=lambda k: (load[k], k))
            owner[unit] = process
            load[process] += self.unit_sizes[unit]
        return owner

    @property
    def shard_path(self) -> Path:
        return self.out_dir / SHARDS_FOLDER / f"process-{self.workers.index}-of-{self.workers.count}.jsonl"

    def open(self) -> None:
        """Writes job.json (the main process, before the others look) or checks that it is this job's."""
        with self.workers.main_first():
            path = self.out_dir / JOB_FILE
            if path.exists():
                recorded = read_job(self.out_dir)
                if recorded.get("fingerprint") != self.fingerprint:
                    raise JobError(
                        f"{self.out_dir} holds a job with other settings ({recorded.get('command')}, fingerprint "
                        f"{recorded.get('fingerprint')}); use a new --out folder"
                    )
            else:  # the main process, or (without a launcher's barrier) whichever comes first: same bytes
                (self.out_dir / SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
                write_json(path, self.to_json(), indent=1)
        (self.out_dir / SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
        (self.out_dir / LOGS_FOLDER).mkdir(parents=True, exist_ok=True)
        drop_torn_line(self.shard_path)  # a line torn by a kill: appends start on a new line

    def completed(self) -> dict[int, Any]:
        """Every whole unit in every shard of the folder (any process count)."""
        units: dict[int, Any] = {}
        folder = self.out_dir / SHARDS_FOLDER
        for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
            for unit, payload in read_shard(path, self.fingerprint).items():
                if unit >= len(self.unit_sizes):
                    raise JobError(f"{path} holds unit {unit} of a job of {len(self.unit_sizes)} units")
                units.setdefault(unit, payload)
        return units

    def _append(self, unit: int, payload: Any) -> None:
        path = self.shard_path
        text = json.dumps({"unit": unit, "payload": payload}, default=_plain, allow_nan=True) + "\n"
        if not path.exists() or path.stat().st_size == 0:
            text = json.dumps({"job": self.fingerprint}) + "\n" + text
        append_text(path, text)

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        append_text(
            self.out_dir / LOGS_FOLDER / f"process-{self.workers.index}.log", f"{stamp} {message}\n", sync=False
        )

    def run(self, compute: Callable[[int], Any], progress: bool = True, unit_name: str = "img") -> list[Any] | None:
        """Computes this process's missing units; on the main process, once every process is done,
        returns every unit's payload in unit order (read back from the shards); elsewhere None."""
        from tqdm.auto import tqdm

        self.open()
        done = self.completed()
        owners = self.owners()
        mine = [u for u in range(len(self.unit_sizes)) if owners[u] == self.workers.index and u not in done]
        self.log(
            f"process {self.workers.index} of {self.workers.count}: {len(mine)} units to do, "
            f"{len(done)} of {len(self.unit_sizes)} done before"
        )
        total = sum(self.unit_sizes)
        bar = tqdm(total=total, unit=unit_name, disable=not (progress and self.workers.is_main))
        bar.update(sum(self.unit_sizes[u] for u in done))
        watcher = _ProgressWatcher(self, bar) if self.workers.count > 1 and self.workers.is_main else None
        try:
            for unit in mine:
                started = time.monotonic()
                self._append(unit, compute(unit))
                self.log(f"unit {unit} ({self.unit_sizes[unit]} {unit_name}) in {time.monotonic() - started:.2f} s")
                if watcher is None:
                    bar.update(self.unit_sizes[unit])
            self.log("done")
            self.workers.wait_for_everyone()
        finally:
            if watcher is not None:
                watcher.stop()
            bar.close()
        if not self.workers.is_main:
            return None
        return collect(self.out_dir, self.fingerprint)


class _ProgressWatcher:
    """On the main process: moves the job's bar as any process's shard grows (polled, read-only)."""

    def __init__(self, job: Job, bar: Any, every: float = 0.5) -> None:
        self.job, self.bar, self.every = job, bar, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _count(self) -> int:
        """Images of the whole units in all shards, from each line's head (``{"unit": u, …``)."""
        units = set()
        for path in (self.job.out_dir / SHARDS_FOLDER).glob("*.jsonl"):
            try:
                lines = path.read_bytes().split(b"\n")[1:-1]
            except OSError:
                continue
            for line in lines:
                head = line[: line.find(b",")]
                if head.startswith(b'{"unit": ') and head[9:].isdigit():
                    units.add(int(head[9:]))
        return sum(self.job.unit_sizes[u] for u in units if u < len(self.job.unit_sizes))

    def _watch(self) -> None:
        while not self.stopped.wait(self.every):
            self.bar.update(max(0, self._count() - self.bar.n))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.bar.update(max(0, self._count() - self.bar.n))


def read_job(out_dir: str | Path) -> dict:
    """The folder's job.json."""
    path = Path(out_dir) / JOB_FILE
    if not path.exists():
        raise JobError(
            f"{out_dir} holds no job ({JOB_FILE}); give the --out folder of a study, edit-sweep, "
            "bench-methods or evaluate run"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise JobError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(record, dict) or not {"command", "fingerprint", "settings", "units"} <= set(record):
        raise JobError(f"{path} is not a job record of negprompt")
    return record


def collect(out_dir: str | Path, fingerprint: str | None = None) -> list[Any]:
    """Every unit's payload in unit order from the folder's shards; refuses missing units and foreign shards."""
    record = read_job(out_dir)
    fingerprint = fingerprint or record["fingerprint"]
    if record["fingerprint"] != fingerprint:
        raise JobError(f"{out_dir} holds a job with other settings (fingerprint {record['fingerprint']})")
    job = Job(Path(out_dir), record["command"], record["settings"], list(record["units"]))
    if job.fingerprint != fingerprint:
        raise JobError(f"{Path(out_dir) / JOB_FILE} was edited: its settings no longer give its fingerprint")
    units = job.completed()
    missing = [u for u in range(len(job.unit_sizes)) if u not in units]
    if missing:
        raise JobError(
            f"{out_dir}: {len(missing)} of {len(job.unit_sizes)} units are not done yet (first: unit {missing[0]}); "
            f"launch the same {record['command']} command again to finish them"
        )
    return [units[u] for u in range(len(job.unit_sizes))]
