"""Output paths: checked before any work starts, never silently replaced (written by :mod:`negprompt.files`).

Light on purpose (no torch, numpy or PIL): the command line checks its outputs before it imports the
model code.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from negprompt.errors import NegpromptError


class OutputError(NegpromptError):
    """An output path that cannot or may not be written."""


# A file is written through a temporary ``.NAME.XXXXXXXX.tmp`` beside it (negprompt.files): 14 bytes more.
TEMPORARY_NAME_EXTRA = 14
ROOM_INSIDE = 64  # bytes a folder output's own files add to its path (``/.results.csv.XXXXXXXX.tmp`` …)


def shown(path: str | Path) -> str:
    """A path for a one-line message: whole up to 80 characters, else its start and "…"."""
    text = str(path)
    return text if len(text) <= 80 else text[:60] + "…"


def _status(path: Path, given: Path) -> os.stat_result | None:
    """``os.stat`` of ``path`` (links followed); None where nothing is (or can be: a name too long). A
    loop of symbolic links and a file in the middle of the path are the user's: :class:`OutputError`."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise OutputError(f"cannot write {shown(given)}: a part of the path is a file, not a folder") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OutputError(
                f"cannot write {shown(given)}: {shown(path)} goes through a loop of symbolic links"
            ) from None
        if error.errno == errno.ENAMETOOLONG:
            return None  # nothing can be there: the lengths are checked (and named) on the way up
        raise


def _check_lengths(path: Path, folder: bool, existing: Path) -> None:
    """Refuses names and paths the file system cannot hold, counting what writing them adds."""
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (not POSIX): the common limits
        name_max, path_max = 255, 4096
    parts = path.parts
    for index, part in enumerate(parts):
        limit = name_max - (TEMPORARY_NAME_EXTRA if index == len(parts) - 1 and not folder else 0)
        size = len(os.fsencode(part))
        if size > limit:
            raise OutputError(
                f"cannot write {shown(path)}: the name {part[:24] + '…' if len(part) > 24 else part} is {size} bytes; give a name of at most "
                f"{limit} bytes (the file system's limit{', less what its temporary adds' if limit < name_max else ''})"
            )
    size = len(os.fsencode(str(path))) + (ROOM_INSIDE if folder else TEMPORARY_NAME_EXTRA)
    if size > path_max:
        raise OutputError(
            f"cannot write {shown(path)}: the path is {len(os.fsencode(str(path)))} bytes; give one of at most "
            f"{path_max - (ROOM_INSIDE if folder else TEMPORARY_NAME_EXTRA)} bytes (the file system's limit)"
        )


def check_destination(path: str | Path, folder: bool = False) -> None:
    """Raises :class:`OutputError` unless ``path`` (a file, or with ``folder`` a folder) can be written.

    Called before any work, so that no run is lost to an output that cannot be written: the path
    must not be a folder where a file is meant (or the reverse), must not go through a loop of
    symbolic links, its names and length must fit the file system (with the temporary a write adds),
    and its nearest existing ancestor must be a writable folder.
    """
    path = Path(path)
    status = _status(path, path)
    if status is not None and stat.S_ISDIR(status.st_mode) != folder:
        kind, wanted = ("a folder", "a file name") if stat.S_ISDIR(status.st_mode) else ("a file", "a folder")
        raise OutputError(f"cannot write {path}: it is {kind}; give {wanted} for the output")
    ancestor = path if folder and status is not None else path.parent
    found = _status(ancestor, path)
    while found is None and ancestor != ancestor.parent:
        ancestor = ancestor.parent
        found = _status(ancestor, path)
    _check_lengths(path, folder, ancestor if found is not None else Path("."))
    if found is not None and not stat.S_ISDIR(found.st_mode):
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: the folder {ancestor} is not writable")


def output_paths(out: str | Path, seeds: Sequence[int]) -> list[Path]:
    """``out`` for one image; ``stem-s{seed}.png`` beside it for several."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise OutputError(f"output path {str(out)!r} must end in .png")
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-s{seed}{out.suffix}") for seed in seeds]


def check_outputs(out: str | Path, seeds: Sequence[int], overwrite: bool = True) -> list[Path]:
    """The PNG paths of an image per seed (see :func:`output_paths`), each checked to be writable
    (and, without ``overwrite``, not to exist)."""
    paths = output_paths(out, seeds)
    for path in paths:
        check_destination(path)
    if not overwrite:
        refuse_existing(paths)
    return paths


def refuse_existing(paths: Iterable[Path]) -> None:
    """Raises :class:`OutputError` naming the first of ``paths`` that exists (for ``--no-overwrite``)."""
    existing = [path for path in paths if Path(path).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0]} exists{more}; give another --out, or drop --no-overwrite to replace it")


def report_written(paths: Iterable[Path], existed: Iterable[Path]) -> list[str]:
    """One line per written file: "wrote P", or "replaced P" for a file that was there before."""
    before = {Path(p) for p in existed}
    return [f"{'replaced' if Path(p) in before else 'wrote'} {p}" for p in paths]
