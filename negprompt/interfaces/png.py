"""PNG files that carry their settings, written atomically.

Each image gets two text chunks: ``parameters`` (AUTOMATIC1111-style infotext, for people and other
tools) and ``negprompt`` (JSON: every setting of the run plus the image's index in its batch, for
``negprompt generate --from-png``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from negprompt.api import Generation, RunSpec, SettingsError, to_uint8
from negprompt.files import write_atomically
from negprompt.interfaces.outputs import output_paths

SETTINGS_CHUNK = "negprompt"
INFOTEXT_CHUNK = "parameters"


def png_info(settings: RunSpec, index: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(INFOTEXT_CHUNK, settings.infotext(index))
    info.add_text(SETTINGS_CHUNK, json.dumps({"index": index, "settings": settings.to_json()}))
    return info


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
