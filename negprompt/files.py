"""Writing files so that a crash or a full disk never leaves half a file: the one place that does it.

- :func:`write_atomically` (and :func:`write_text`, :func:`write_json` on it): each file is written to a
  temporary file beside it, flushed to the disk (fsync), then renamed over the final name (``os.replace``),
  all files of one call or none; the temporaries are removed when anything fails. A reader sees the old
  file or the new one, never a mix.
- :func:`append_text`: appends one record (e.g. a JSON line or CSV rows) in one write, flushed and
  fsynced; :func:`drop_torn_line` cuts the torn last line a kill can leave, so the next append starts
  on a new line.

Standard library only: every layer of negprompt may import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TEMPORARY_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync(path: Path) -> None:
    """Flushes a closed file's data to the disk."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_temporary(path: Path, final: Path | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`write_atomically` (of ``final``, if given), e.g. one
    left behind by a kill."""
    name = path.name
    prefix = f".{final.name}." if final is not None else "."
    return name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX)


def write_atomically(paths: Sequence[Path], write_one: Callable[[Path, Path], None]) -> list[Path]:
    """Writes every file to a temporary name first, then renames them all: all files or none.

    ``write_one(final, temporary)`` writes the content of ``final`` to ``temporary`` (its name is
    ``.NAME.XXXXXXXX.tmp`` beside ``final``, so give writers an explicit format). Folders are created as
    needed. The files get the mode the user's umask gives new files (the temporary file is private).
    """
    paths = [Path(path) for path in paths]
    temporaries: list[Path] = []
    mode = 0o666 & ~_umask()
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
            os.close(handle)
            temporaries.append(Path(name))
            write_one(path, Path(name))
            _sync(Path(name))
            os.chmod(name, mode)
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return paths


def _write_text_to(text: str) -> Callable[[Path, Path], None]:
    def write_one(final: Path, temporary: Path) -> None:
        with open(temporary, "w") as handle:
            handle.write(text)

    return write_one


def write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (see :func:`write_atomically`)."""
    return write_atomically([Path(path)], _write_text_to(text))[0]


def json_text(data: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """The JSON text negprompt writes: ``json.dumps`` with ``indent``, then a newline."""
    return json.dumps(data, indent=indent, default=default) + "\n"


def write_json(
    path: str | Path, data: Any, indent: int | None = 2, default: Callable[[Any], Any] | None = None
) -> Path:
    """Writes ``data`` as JSON (:func:`json_text`) to ``path`` atomically."""
    return write_text(path, json_text(data, indent, default))


def append_text(path: str | Path, text: str, sync: bool = True) -> None:
    """Appends ``text`` to ``path`` in one write; with ``sync`` (the default) flushed and fsynced, so that a
    record appended before a crash is on the disk after it."""
    with open(path, "a") as handle:
        handle.write(text)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())


def drop_torn_line(path: str | Path) -> None:
    """Cuts what follows the last newline of ``path`` (a line torn by a kill), if anything; fsynced."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(whole))
            handle.flush()
            os.fsync(handle.fileno())
