"""PNG files that carry their settings, written atomically.

Each image gets two text chunks: ``parameters`` (AUTOMATIC1111-style infotext, for people and other
tools) and ``negprompt`` (JSON: every setting of the run plus the image's index in its batch, for
``negprompt generate --from-png``).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from negprompt.api import Generation, RunSpec, SettingsError, to_uint8
from negprompt.files import write_atomically
from negprompt.interfaces.outputs import output_paths
from negprompt.limits import MAX_SETTINGS_BYTES

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
    """Settings and batch index stored in a PNG written by negprompt.

    The PNG's chunks are read without decoding a pixel (:func:`png_text`), so a crafted header (30 000²
    pixels), a decompression bomb in a text chunk or JSON nested 200 000 deep each end in one
    :class:`SettingsError` line."""
    path = Path(path)
    text = png_text(path, SETTINGS_CHUNK)
    if text is None:
        raise SettingsError(
            f"{path} carries no negprompt settings (no '{SETTINGS_CHUNK}' text chunk); give a PNG written by negprompt generate"
        )
    try:
        record = json.loads(text)
        settings = RunSpec.from_json(record["settings"])
        index = record["index"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise SettingsError(
            f"{path} has a damaged '{SETTINGS_CHUNK}' chunk ({error}); give a PNG written by negprompt generate"
        ) from None
    except RecursionError:
        raise SettingsError(
            f"{path}: its '{SETTINGS_CHUNK}' chunk nests JSON too deeply; give a PNG written by negprompt generate"
        ) from None
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(settings.seeds):
        shown = json.dumps(index) if len(json.dumps(index)) < 40 else json.dumps(index)[:39] + "…"
        raise SettingsError(
            f"{path}: image index {shown} is not one of its batch of {len(settings.seeds)} "
            f"(a whole number 0–{len(settings.seeds) - 1})"
        )
    return settings, index


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")  # uncompressed Latin-1, compressed Latin-1, international (UTF-8)
KEYWORD_ROOM = 80  # a text chunk's keyword (1–79 bytes) and its NUL


def png_text(path: Path, keyword: str) -> str | None:
    """The text of ``path``'s last text chunk named ``keyword`` (None if it has none), read chunk by chunk
    without decoding the image: other chunks are skipped unread, the chunk's CRC is checked and its text,
    decompressed if need be, may hold at most ``MAX_SETTINGS_BYTES`` (``negprompt.limits``)."""
    found = None
    try:
        with open(path, "rb") as file:
            if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise SettingsError(
                    f"cannot read {path} as a PNG (it lacks the PNG signature); give a PNG written by negprompt"
                )
            while True:
                head = file.read(8)
                if len(head) < 8:
                    raise SettingsError(f"{path} is a truncated PNG (it ends before its IEND chunk)")
                length, kind = struct.unpack(">I", head[:4])[0], head[4:]
                if kind == b"IEND":
                    return found
                start = file.read(min(length, KEYWORD_ROOM)) if kind in TEXT_CHUNKS else b""
                if not start.startswith(keyword.encode("latin-1") + b"\0"):
                    file.seek(length - len(start) + 4, 1)  # another chunk: its data and CRC, unread
                    continue
                if length > MAX_SETTINGS_BYTES + KEYWORD_ROOM:
                    raise SettingsError(
                        f"{path}: its '{keyword}' chunk is {length} bytes; negprompt writes settings of at most "
                        f"{MAX_SETTINGS_BYTES} bytes (give a PNG written by negprompt generate)"
                    )
                data, crc = start + file.read(length - len(start)), file.read(4)
                if len(data) < length or len(crc) < 4:
                    raise SettingsError(f"{path} is a truncated PNG (it ends inside a {kind.decode()} chunk)")
                if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
                    raise SettingsError(f"{path} is damaged: its {kind.decode()} chunk fails its checksum")
                text = _chunk_text(path, kind, data, keyword)
                found = text if text is not None else found
    except FileNotFoundError:
        raise SettingsError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise SettingsError(f"{path} is a folder; give a PNG written by negprompt") from None
    except OSError as error:
        raise SettingsError(
            f"cannot read {path} ({error.strerror or error}); give a PNG written by negprompt"
        ) from None


def _chunk_text(path: Path, kind: bytes, data: bytes, keyword: str) -> str | None:
    """The text of one text chunk (PNG specification §11.3.4) if its keyword is ``keyword``, else None."""
    name, separator, rest = data.partition(b"\0")
    if not separator or name != keyword.encode("latin-1"):
        return None
    compressed = kind == b"zTXt"
    if kind == b"zTXt":
        rest = rest[1:]  # the compression method (0: zlib)
    elif kind == b"iTXt":
        if len(rest) < 2:
            raise SettingsError(f"{path} is damaged: its '{keyword}' iTXt chunk is cut short")
        fields = rest[2:].split(b"\0", 2)  # language tag, translated keyword, text
        if len(fields) < 3:
            raise SettingsError(f"{path} is damaged: its '{keyword}' iTXt chunk is cut short")
        compressed, rest = rest[0] == 1, fields[2]
    if compressed:
        inflate = zlib.decompressobj()
        try:
            rest = inflate.decompress(rest, MAX_SETTINGS_BYTES + 1)
        except zlib.error as error:
            raise SettingsError(f"{path} is damaged: its '{keyword}' chunk does not decompress ({error})") from None
        if not inflate.eof and len(rest) <= MAX_SETTINGS_BYTES:
            raise SettingsError(f"{path} is damaged: its '{keyword}' chunk's compressed text is cut short")
    if len(rest) > MAX_SETTINGS_BYTES:
        raise SettingsError(
            f"{path}: its '{keyword}' chunk holds over {MAX_SETTINGS_BYTES} bytes; negprompt writes settings of "
            "at most that (a PNG written by negprompt generate)"
        )
    try:
        return rest.decode("utf-8" if kind == b"iTXt" else "latin-1")
    except UnicodeDecodeError as error:
        raise SettingsError(f"{path}: its '{keyword}' chunk is not UTF-8 text (byte at offset {error.start})") from None


def read_pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
