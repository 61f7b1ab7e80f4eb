"""PNG files that carry their settings, written atomically.

Each image gets two text chunks: ``parameters`` (AUTOMATIC1111-style infotext, for people and other
tools) and ``negprompt`` (JSON: every setting of the run plus the image's index in its batch, for
``negprompt generate --from-png``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from negprompt.api import Generation, RunSpec, SettingsError, to_uint8

SETTINGS_CHUNK = "negprompt"
INFOTEXT_CHUNK = "parameters"


def check_destination(path: str | Path, folder: bool = False) -> None:
    """Raises :class:`SettingsError` unless ``path`` (a file, or with ``folder`` a folder) can be written.

    Called before any work, so that no run is lost to an output that cannot be written: the path
    must not be a folder where a file is meant (or the reverse), and its nearest existing ancestor
    must be a writable folder.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind, wanted = ("a folder", "a file name") if path.is_dir() else ("a file", "a folder")
        raise SettingsError(f"cannot write {path}: it is {kind}; give {wanted} for the output")
    ancestor = path if folder and path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SettingsError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SettingsError(f"cannot write {path}: the folder {ancestor} is not writable")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(paths: Sequence[Path], write_one) -> list[Path]:
    """Writes every file to a temporary name first, then renames them all: all files or none.

    The files get the mode the user's umask gives new files (the temporary file is private).
    """
    temporaries: list[Path] = []
    mode = 0o666 & ~_umask()
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
            os.close(handle)
            temporaries.append(Path(name))
            write_one(path, Path(name))
            os.chmod(name, mode)
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return list(paths)


def png_info(settings: RunSpec, index: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_CHUNK, settings.infotext(index))
    info.add_text(SETTINGS_CHUNK, json.dumps({"index": index, "settings": settings.to_json()}))
    return info


def output_paths(out: str | Path, seeds: Sequence[int]) -> list[Path]:
    """``out`` for one image; ``stem-s{seed}.png`` beside it for several."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise SettingsError(f"output path {str(out)!r} must end in .png")
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-s{seed}{out.suffix}") for seed in seeds]


def check_outputs(out: str | Path, seeds: Sequence[int]) -> list[Path]:
    """The PNG paths of an image per seed (see :func:`output_paths`), each checked to be writable."""
    paths = output_paths(out, seeds)
    for path in paths:
        check_destination(path)
    return paths


def save_generation(generation: Generation, out: str | Path, indices: Sequence[int] | None = None) -> list[Path]:
    """Saves images of ``generation`` (all, or those at ``indices``) with their settings."""
    settings = generation.spec
    indices = list(range(len(settings.seeds))) if indices is None else list(indices)
    paths = output_paths(out, [settings.seeds[i] for i in indices])
    by_path = dict(zip(paths, indices))

    def write_one(final: Path, temporary: Path) -> None:
        index = by_path[final]
        image = Image.fromarray(to_uint8(generation.pixels[index]))
        image.save(temporary, format="PNG", pnginfo=png_info(settings, index))

    return write_atomically(paths, write_one)


def read_png_settings(path: str | Path) -> tuple[RunSpec, int]:
    """Settings and batch index stored in a PNG written by negprompt."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.format != "PNG":
                raise SettingsError(f"{path} is a {image.format} file, not a PNG written by negprompt")
            text = dict(getattr(image, "text", {}) or {})
    except FileNotFoundError:
        raise SettingsError(f"no such file: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise SettingsError(
            f"cannot read {path} as an image ({error.__class__.__name__}); give a PNG written by negprompt"
        ) from None
    if SETTINGS_CHUNK not in text:
        raise SettingsError(
            f"{path} carries no negprompt settings (no '{SETTINGS_CHUNK}' text chunk); give a PNG written by negprompt generate"
        )
    try:
        record = json.loads(text[SETTINGS_CHUNK])
        settings = RunSpec.from_json(record["settings"])
        index = int(record["index"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SettingsError(
            f"{path} has a damaged '{SETTINGS_CHUNK}' chunk ({error}); give a PNG written by negprompt generate"
        ) from None
    if not 0 <= index < len(settings.seeds):
        raise SettingsError(f"{path}: image index {index} is outside its batch of {len(settings.seeds)}")
    return settings, index


def read_pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
