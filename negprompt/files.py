"""Writing files so that a crash or a full disk never leaves half a file: the one place that does it.

- :func:`write_atomically` (and :func:`write_text`, :func:`write_json` on it): each file is written to a
  temporary file beside it, flushed to the disk (fsync), then renamed over the final name (``os.replace``),
  all files of one call or none; the temporaries are removed when anything fails. A reader sees the old
  file or the new one, never a mix.
- :func:`write_folder_atomically`: the same for a whole folder (an exported model): written beside the
  final name, every file fsynced and given the umask's mode, then renamed into place.
- :func:`append_text`: appends one record (e.g. a JSON line or CSV rows) in one write, flushed and
  fsynced; :func:`drop_torn_line` cuts the torn last line a kill can leave, so the next append starts
  on a new line.

A temporary is locked (``flock``) while it is written, and the next write of the same name removes
the temporaries of that name that no live process holds: what a kill -9 left (only names of the form
``.NAME.XXXXXXXX.tmp`` that ``tempfile`` gives, never another file). A writer that reports a full disk
or another I/O failure in its own exception (safetensors does) raises it as the ``OSError`` it is.

Standard library only: every layer of negprompt may import it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temporaries are neither locked nor cleaned
    fcntl = None  # type: ignore[assignment]

TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")  # what tempfile puts between prefix and suffix
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) report an OSError


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


def _lock(descriptor: int, wait: bool) -> bool:
    """Takes the exclusive lock of an open file or folder; without ``wait``, False if another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _is_ours(name: str, final_name: str) -> bool:
    """Whether ``name`` is a temporary this module made for ``final_name`` (``.NAME.XXXXXXXX.tmp``)."""
    prefix = f".{final_name}."
    middle = name[len(prefix) : -len(TEMPORARY_SUFFIX)]
    return name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX) and bool(_RANDOM_PART.fullmatch(middle))


def remove_stale_temporaries(finals: Sequence[Path]) -> list[Path]:
    """Removes the temporaries of ``finals`` (files or folders named ``.NAME.XXXXXXXX.tmp`` beside them)
    that no live writer holds locked: what a kill left. Returns what it removed."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    by_folder: dict[Path, set[str]] = {}
    for final in finals:
        by_folder.setdefault(Path(final).parent, set()).add(Path(final).name)
    for folder, names in by_folder.items():
        try:
            entries = [entry for entry in os.scandir(folder) if entry.name.startswith(".")]
        except OSError:  # no folder yet: nothing left in it
            continue
        for entry in entries:
            if not any(_is_ours(entry.name, name) for name in names):
                continue
            try:
                descriptor = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                if _lock(descriptor, wait=False):  # no live writer: a kill left it
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass
            finally:
                os.close(descriptor)
    return removed


def _os_error_of(error: BaseException, path: Path) -> BaseException:
    """``error`` as the OSError it reports (safetensors: "I/O error: No space left on device (os error 28)"),
    else ``error`` itself."""
    if isinstance(error, OSError):
        return error
    found = _OS_ERROR.search(str(error))
    if found is None:
        return error
    number = int(found.group(1))
    return OSError(number, os.strerror(number), str(path))


@contextmanager
def _temporary_file(final: Path) -> Iterator[Path]:
    """A new temporary file beside ``final``, locked while the block runs (then closed, not removed)."""
    while True:
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TEMPORARY_SUFFIX, dir=final.parent)
        _lock(handle, wait=True)
        try:
            if os.stat(name).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:  # a cleaner took it between mkstemp and the lock: take another
            pass
        os.close(handle)
    try:
        yield Path(name)
    finally:
        os.close(handle)


def _reraise_as_os_error(error: Exception, path: Path) -> None:
    """Raises the OSError ``error`` reports, if it reports one (see :func:`_os_error_of`)."""
    reported = _os_error_of(error, path)
    if reported is not error:
        raise reported from error


def write_atomically(paths: Sequence[Path], write_one: Callable[[Path, Path], None]) -> list[Path]:
    """Writes every file to a temporary name first, then renames them all: all files or none.

    ``write_one(final, temporary)`` writes the content of ``final`` to ``temporary`` (its name is
    ``.NAME.XXXXXXXX.tmp`` beside ``final``, so give writers an explicit format). Folders are created as
    needed; temporaries of these names left by a kill are removed first. The files get the mode the
    user's umask gives new files (the temporary file is private).
    """
    paths = [Path(path) for path in paths]
    mode = 0o666 & ~_umask()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(paths)
    temporaries: list[Path] = []
    with ExitStack() as held:  # each temporary locked until every rename is done
        try:
            for path in paths:
                temporaries.append(held.enter_context(_temporary_file(path)))
                try:
                    write_one(path, temporaries[-1])
                except Exception as error:
                    _reraise_as_os_error(error, path)
                    raise
                _sync(temporaries[-1])
                os.chmod(temporaries[-1], mode)
            for temporary, path in zip(temporaries, paths):
                os.replace(temporary, path)
        finally:
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
    return paths


def write_folder_atomically(folder: str | Path, write_into: Callable[[Path], None]) -> Path:
    """Writes a whole folder (e.g. an exported model) to a temporary folder beside it, then renames it in
    place of ``folder`` (an old one is removed): a reader sees the old folder or the new one.

    ``write_into(temporary)`` fills the temporary folder. Every file in it is then fsynced and given the
    mode the umask gives new files (libraries that write through temporaries of their own leave 0600),
    every folder the umask's folder mode. Temporaries of ``folder`` left by a kill are removed first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries([folder])
    mask = _umask()
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TEMPORARY_SUFFIX, dir=folder.parent))
    descriptor = os.open(temporary, os.O_RDONLY)
    old: Path | None = None
    try:
        _lock(descriptor, wait=True)
        try:
            write_into(temporary)
        except Exception as error:
            _reraise_as_os_error(error, folder)
            raise
        for root, folders, files in os.walk(temporary):
            for name in files:
                _sync(Path(root) / name)
                os.chmod(Path(root) / name, 0o666 & ~mask)
            for name in folders:
                os.chmod(Path(root) / name, 0o777 & ~mask)
        os.chmod(temporary, 0o777 & ~mask)
        if folder.is_dir() and not folder.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TEMPORARY_SUFFIX, dir=folder.parent))
            os.replace(folder, old)  # a folder renamed over an empty one
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)  # the old folder back
            old = None
        raise
    finally:
        os.close(descriptor)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


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
