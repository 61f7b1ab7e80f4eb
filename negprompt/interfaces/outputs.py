"""Output paths: checked before any work starts, never silently replaced (written by :mod:`negprompt.files`).

Light on purpose (no torch, numpy or PIL): the command line checks its outputs before it imports the
model code.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from negprompt.errors import NegpromptError


class OutputError(NegpromptError):
    """An output path that cannot or may not be written."""


def check_destination(path: str | Path, folder: bool = False) -> None:
    """Raises :class:`OutputError` unless ``path`` (a file, or with ``folder`` a folder) can be written.

    Called before any work, so that no run is lost to an output that cannot be written: the path
    must not be a folder where a file is meant (or the reverse), and its nearest existing ancestor
    must be a writable folder.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, wanted = ("a folder", "a file name") if path.is_dir() else ("a file", "a folder")
        raise OutputError(f"cannot write {path}: it is {kind}; give {wanted} for the output")
    ancestor = path if folder and path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
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
