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
``negprompt merge OUT`` does that last step alone. Shards of another job are refused, and so is a
unit whose payload is not what its command writes (each command gives a :data:`PayloadCheck`, e.g. with
:func:`check_shape`): every shard is read and checked before any output is written or replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
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


class PayloadError(ValueError):
    """What is wrong with one unit's payload; the job adds where the unit is (shard and line)."""


# A command's check of one unit's payload: (the job record of job.json, unit, payload) → None, or raises
# PayloadError (or TypeError/ValueError) saying what is wrong. Runs on every unit read from a shard.
PayloadCheck = Callable[[dict, int, Any], None]


def json_kind(value: Any) -> str:
    """The JSON kind of ``value``, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_shape(value: Any, shape: Any, where: str = "payload") -> None:
    """Raises :class:`PayloadError` naming the first place where ``value`` (read from JSON) does not have ``shape``.

    Shapes: ``str``, ``bool``, ``int`` (not true/false), ``float`` (any number, NaN and ±inf included:
    shards are written with them), ``None``; a tuple of shapes (any one of them); ``[shape]`` (a list of
    such items); ``{key: shape}`` (an object with exactly these keys)."""
    if isinstance(shape, tuple):
        errors = []
        for option in shape:
            try:
                return check_shape(value, option, where)
            except PayloadError as error:
                errors.append(error)
        raise errors[0]
    if shape is None:
        ok = value is None
    elif shape is bool:
        ok = isinstance(value, bool)
    elif shape is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif shape is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif shape is str:
        ok = isinstance(value, str)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise PayloadError(f"{where} is {json_kind(value)}, not a list")
        for index, item in enumerate(value):
            check_shape(item, shape[0], f"{where}[{index}]")
        return
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise PayloadError(f"{where} is {json_kind(value)}, not an object")
        if set(value) != set(shape):
            missing = sorted(set(shape) - set(value))
            extra = [key[:20] for key in sorted(set(value) - set(shape))[:3]]
            raise PayloadError(f"{where} has other keys than {sorted(shape)} (missing {missing}, extra {extra})")
        for key, item in shape.items():
            check_shape(value[key], item, f"{where}[{key!r}]")
        return
    else:  # pragma: no cover - a shape of the code, not of the data
        raise TypeError(f"unknown shape {shape!r}")
    if not ok:
        wanted = {None: "null", bool: "true/false", int: "a whole number", float: "a number", str: "text"}[shape]
        raise PayloadError(f"{where} is {json_kind(value)} ({str(value)[:40]!r}), not {wanted}")


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


def _json_line(line: bytes) -> Any:
    """One JSON line; ValueError for text that is not UTF-8 JSON (or nests too deeply to read)."""
    try:
        return json.loads(line.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_shard(
    path: Path, fingerprint: str | None, check: Callable[[int, Any], None] | None = None, unit_count: int | None = None
) -> dict[int, Any]:
    """The whole units in one shard file (a torn last line is left out); refuses another job's shard, a
    damaged line, a unit number outside ``range(unit_count)``, and a payload ``check(unit, payload)`` refuses."""
    if not path.is_file():
        raise JobError(
            f"{path} is not a shard file (a folder or another kind of file); remove it from the shards folder"
        )
    lines = path.read_bytes().split(b"\n")
    lines = lines[:-1]  # after the last newline: empty, or a line torn by a kill
    if not lines:
        return {}
    try:
        header = _json_line(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("job"), str):
        raise JobError(f'{path} is not a shard of negprompt (its first line is not {{"job": FINGERPRINT}})')
    if fingerprint is not None and header["job"] != fingerprint:
        raise JobError(
            f"{path} holds units of another job (fingerprint {header['job'][:40]}, this job's {fingerprint}); "
            "merge only shards of one command with the same settings, or use a new --out folder"
        )
    units = {}
    for number, line in enumerate(lines[1:], 2):
        try:
            record = _json_line(line)
            unit, payload = record["unit"], record["payload"]
        except (ValueError, KeyError, TypeError):
            raise JobError(
                f"{path}, line {number}: not a whole unit (a damaged shard); delete it to redo its units"
            ) from None
        if not isinstance(unit, int) or isinstance(unit, bool) or unit < 0:
            raise JobError(
                f"{path}, line {number}: unit {str(unit)[:20]!r} is not a unit number (a damaged shard); delete it to redo its units"
            )
        if unit_count is not None and unit >= unit_count:
            raise JobError(
                f"{path}, line {number}: unit {unit} of a job of {unit_count} units; delete the shard to redo its units"
            )
        if check is not None:
            try:
                check(unit, payload)
            except (PayloadError, TypeError, ValueError, KeyError, IndexError) as error:
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise JobError(
                    f"{path}, line {number}: unit {unit} is not what this command writes ({message}); "
                    "a damaged shard: delete it to redo its units"
                ) from None
        units[unit] = payload
    return units


@dataclass
class Job:
    """The units of one command's run in ``out_dir``; ``unit_sizes[u]`` = images of unit u (for progress)."""

    out_dir: Path
    command: str
    settings: dict
    unit_sizes: list[int]
    workers: Workers = ONE_PROCESS
    _unit_bar: UnitBar | None = field(default=None, init=False, repr=False, compare=False)  # while it runs

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
        for name in (SHARDS_FOLDER, LOGS_FOLDER):
            _refuse_non_folder(self.out_dir / name)
        with self.workers.main_first():
            path = self.out_dir / JOB_FILE
            if path.exists() or path.is_symlink():
                recorded = read_job(self.out_dir)
                if recorded.get("fingerprint") != self.fingerprint:
                    raise JobError(
                        f"{self.out_dir} holds a job with other settings ({str(recorded.get('command'))[:40]}, "
                        f"fingerprint {str(recorded.get('fingerprint'))[:40]}); use a new --out folder"
                    )
            else:  # the main process, or (without a launcher's barrier) whichever comes first: same bytes
                (self.out_dir / SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
                write_json(path, self.to_json(), indent=1)
        (self.out_dir / SHARDS_FOLDER).mkdir(parents=True, exist_ok=True)
        (self.out_dir / LOGS_FOLDER).mkdir(parents=True, exist_ok=True)
        drop_torn_line(self.shard_path)  # a line torn by a kill: appends start on a new line

    def completed(self, check: PayloadCheck | None = None) -> dict[int, Any]:
        """Every whole unit in every shard of the folder (any process count), each payload passed through
        ``check`` (with this job's record) if given."""
        units: dict[int, Any] = {}
        folder = self.out_dir / SHARDS_FOLDER
        _refuse_non_folder(folder)
        record = self.to_json()
        checked = None if check is None else (lambda unit, payload: check(record, unit, payload))
        for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
            for unit, payload in read_shard(path, self.fingerprint, checked, len(self.unit_sizes)).items():
                units.setdefault(unit, payload)
        return units

    def _append(self, unit: int, payload: Any) -> None:
        path = self.shard_path
        text = json.dumps({"unit": unit, "payload": payload}, default=_plain, allow_nan=True) + "\n"
        if not path.exists() or path.stat().st_size == 0:
            text = json.dumps({"job": self.fingerprint}) + "\n" + text
        append_text(path, text)

    def report(self, fraction: float, doing: str = "") -> None:
        """Called by a unit's computation while it runs: ``fraction`` (0–1) of it is done, ``doing`` says
        what (e.g. "step 7/20"; :class:`StepReport` turns a run's steps into these calls). Moves the
        progress bar within the unit; does nothing outside :meth:`run`."""
        if self._unit_bar is not None:
            self._unit_bar.report(fraction, doing)

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        append_text(
            self.out_dir / LOGS_FOLDER / f"process-{self.workers.index}.log", f"{stamp} {message}\n", sync=False
        )

    def run(
        self,
        compute: Callable[[int], Any],
        progress: bool = True,
        unit_name: str = "img",
        check: PayloadCheck | None = None,
    ) -> list[Any] | None:
        """Computes this process's missing units; on the main process, once every process is done,
        returns every unit's payload in unit order (read back from the shards, each through ``check``);
        elsewhere None. Units already in the shards are checked before any work."""
        from tqdm.auto import tqdm

        self.open()
        done = self.completed(check)
        owners = self.owners()
        mine = [u for u in range(len(self.unit_sizes)) if owners[u] == self.workers.index and u not in done]
        self.log(
            f"process {self.workers.index} of {self.workers.count}: {len(mine)} units to do, "
            f"{len(done)} of {len(self.unit_sizes)} done before"
        )
        bar = tqdm(  # images done before count as there at the start, not as speed
            total=sum(self.unit_sizes),
            initial=sum(self.unit_sizes[u] for u in done),
            unit=unit_name,
            desc=self.command,
            dynamic_ncols=True,
            disable=not (progress and self.workers.is_main),
        )
        several = self.workers.count > 1 and self.workers.is_main  # the bar follows every process's shard
        self._unit_bar = UnitBar(bar, moves_bar=not several)
        watcher = _ProgressWatcher(self, bar, self._unit_bar) if several else None
        try:
            for number, unit in enumerate(mine, 1):
                started = time.monotonic()
                self._unit_bar.begin(self.unit_sizes[unit], f"unit {number} of {len(mine)}")
                payload = compute(unit)
                self._unit_bar.end()
                self._append(unit, payload)
                self.log(f"unit {unit} ({self.unit_sizes[unit]} {unit_name}) in {time.monotonic() - started:.2f} s")
            self.log("done")
            self.workers.wait_for_everyone()
        finally:
            if watcher is not None:
                watcher.stop()
            bar.close()
            self._unit_bar = None
        if not self.workers.is_main:
            return None
        return collect(self.out_dir, self.fingerprint, check)


class _ProgressWatcher:
    """On the main process: moves the job's bar as any process's shard grows (polled, read-only), plus
    the part of its own current unit done (``unit_bar``)."""

    def __init__(self, job: Job, bar: Any, unit_bar: UnitBar, every: float = 0.5) -> None:
        self.job, self.bar, self.unit_bar, self.every = job, bar, unit_bar, every
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
            self.bar.update(max(0, self._count() + self.unit_bar.moved - self.bar.n))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.bar.update(max(0, self._count() - self.bar.n))


UnitReport = Callable[[float, str], None]  # (the part of the current unit done, 0–1; what it is doing)
REDRAW_SECONDS = 0.5  # a report that does not move the bar redraws it (its "step k/n") at most this often


class UnitBar:
    """A job's bar, counted in images, that also moves inside a unit: a unit of 24 images reported at each
    of its 20 steps moves it about one image a step, so that it moves every few seconds and its rate
    (and so its ETA) settles within the first unit, not after it."""

    def __init__(self, bar: Any, moves_bar: bool = True) -> None:
        self.bar, self.moves_bar = bar, moves_bar  # moves_bar False: the watcher of several processes moves it
        self.size, self.moved, self.label = 0, 0, ""
        self.shown = -math.inf  # when a report last redrew the bar without moving it

    def begin(self, size: int, label: str) -> None:
        self.size, self.moved, self.label = size, 0, label
        self.bar.set_postfix_str(label)

    def report(self, fraction: float, doing: str = "") -> None:
        """``fraction`` (0–1) of the current unit is done; ``doing`` says what runs now (e.g. "step 7/20")."""
        target = min(self.size, int(max(0.0, fraction) * self.size))
        redraw = target <= self.moved and time.monotonic() - self.shown >= REDRAW_SECONDS
        self.bar.set_postfix_str(f"{self.label}: {doing}" if doing else self.label, refresh=redraw)
        if redraw:
            self.shown = time.monotonic()
        if target > self.moved:
            if self.moves_bar:
                self.bar.update(target - self.moved)
            self.moved = target

    def end(self) -> None:
        """The unit is done (before its payload is appended: the watcher then counts it from its shard)."""
        if self.moves_bar:
            self.bar.update(self.size - self.moved)
        self.size, self.moved = 0, 0


class StepReport:
    """A run's denoising steps as the progress of a unit, for :meth:`Job.report` (any ``UnitReport``).

    As the sampling loop's ``callback`` it reports each finished step (of group 0: a run's groups step
    together); as one of its ``unet_hooks`` it reports before each UNet call, so that a run of several
    groups (several calls a step) moves within a step too. The run is the part [``first``, ``first``
    + ``share``) of the unit; ``num_steps``: its UNet calls (a callback reads them from each step)."""

    def __init__(
        self, report: UnitReport, num_steps: int | None = None, first: float = 0.0, share: float = 1.0, label: str = ""
    ) -> None:
        self.report, self.num_steps, self.first, self.share, self.label = report, num_steps, first, share, label
        self._step, self._calls, self._calls_per_step = -1, 0, 0

    def __call__(self, info: Any) -> None:  # a StepInfo
        if info.group == 0:
            self._emit(info.step + 1, info.step, info.num_steps)

    def before_unet_call(self, step: int, timestep: float, blocks: Any) -> None:
        if step != self._step:  # a new step: the last one's calls tell how many a step makes
            self._calls_per_step = self._calls if step == self._step + 1 else self._calls_per_step
            self._step, self._calls = step, 0
        within = min(self._calls / self._calls_per_step, 0.99) if self._calls_per_step else 0.0
        self._calls += 1
        self._emit(step + within, step, self.num_steps)

    def _emit(self, done: float, step: int, num_steps: int | None) -> None:
        if not num_steps:
            return
        doing = f"{self.label}step {min(step + 1, num_steps)}/{num_steps}"
        self.report(self.first + self.share * min(done / num_steps, 1.0), doing)


def _refuse_non_folder(path: Path) -> None:
    """A job's shards/ or logs/ that exists as something other than a folder is the user's to move."""
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise JobError(
            f"{path} is not a folder; a job keeps its {path.name} there: move it away or use a new --out folder"
        )


def read_job(out_dir: str | Path) -> dict:
    """The folder's job.json, checked to be a job record (command, fingerprint, settings, unit sizes)."""
    path = Path(out_dir) / JOB_FILE
    if not path.exists() and not path.is_symlink():
        raise JobError(
            f"{out_dir} holds no job ({JOB_FILE}); give the --out folder of a study, edit-sweep, "
            "bench-methods or evaluate run"
        )
    if not path.is_file():
        raise JobError(f"{path} is not a file (a folder or a broken link); it should hold the job's record")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise JobError(f"{path} is not UTF-8 text; it is not a job record of negprompt") from None
    except json.JSONDecodeError as error:
        raise JobError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except (ValueError, RecursionError):  # nested too deeply, a number of thousands of digits
        raise JobError(f"{path} cannot be read as JSON; it is not a job record of negprompt") from None
    if not isinstance(record, dict) or not {"command", "fingerprint", "settings", "units"} <= set(record):
        raise JobError(f"{path} is not a job record of negprompt")
    units = record["units"]
    if (
        not isinstance(record["command"], str)
        or not isinstance(record["fingerprint"], str)
        or not isinstance(record["settings"], dict)
        or not isinstance(units, list)
        or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in units)
    ):
        raise JobError(
            f"{path} is not a job record of negprompt (command and fingerprint must be text, settings an object, "
            "units a list of whole numbers)"
        )
    return record


def collect(out_dir: str | Path, fingerprint: str | None = None, check: PayloadCheck | None = None) -> list[Any]:
    """Every unit's payload in unit order from the folder's shards, each through ``check`` (see
    :data:`PayloadCheck`); refuses missing units, damaged or foreign shards, before anything is written."""
    record = read_job(out_dir)
    fingerprint = fingerprint or record["fingerprint"]
    if record["fingerprint"] != fingerprint:
        raise JobError(f"{out_dir} holds a job with other settings (fingerprint {record['fingerprint'][:40]})")
    job = Job(Path(out_dir), record["command"], record["settings"], list(record["units"]))
    if job.fingerprint != fingerprint:
        raise JobError(f"{Path(out_dir) / JOB_FILE} was edited: its settings no longer give its fingerprint")
    units = job.completed(check)
    missing = [u for u in range(len(job.unit_sizes)) if u not in units]
    if missing:
        raise JobError(
            f"{out_dir}: {len(missing)} of {len(job.unit_sizes)} units are not done yet (first: unit {missing[0]}); "
            f"launch the same {record['command'][:40]} command again to finish them"
        )
    return [units[u] for u in range(len(job.unit_sizes))]
