"""What a video run writes, and the JSON that runs it again (``negprompt generate --from-json``).

A video run's decoded output is frames shaped (B, F, H, W, 3), float32 in [0, 1]: B clips (one per seed)
of F frames. For ``--out NAME.mp4`` (or the default ``NAME.png`` of a video model) it writes

- ``NAME.mp4`` (one clip) or ``NAME-s<seed>.mp4`` (several): H.264 in an MP4, 4:2:0 chroma where both sides
  are even (what every player decodes), else 4:4:4; the run's settings in the container's ``comment`` tag;
- ``NAME.webp`` instead, an animated lossless WebP (Pillow), for ``--out NAME.webp`` or where no MP4 encoder
  is installed; its settings go in an XMP packet (WebP has no comment tag);
- ``NAME_frames/clip_000/frame_000.png`` …: every frame as a PNG, exactly the pixels of the run;
- ``NAME.json``: the run (:func:`run_record`): the settings dict a PNG's ``negprompt`` chunk records, the
  infotext of each clip, the frame count and the frame rate. ``--from-json NAME.json`` runs it again.

The encoder is PyAV (the package ``av``, the optional extra ``negprompt[video]``): its wheels bundle FFmpeg
with libx264 (H.264) for Linux, macOS and Windows on Python ≥ 3.11 (36 MB for av 18.1), and it encodes
in-process from numpy arrays, so the tests decode the same MP4 back with the same library. imageio-ffmpeg
ships an FFmpeg executable instead (68 MB) that is fed through a pipe. PyAV is BSD-3-Clause; the FFmpeg
it bundles is built with libx264 and so is under the GPL: negprompt does not ship it, the user installs it.

Light at import (no numpy, PIL or av): the command line plans its outputs before it imports the model code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from negprompt.interfaces.outputs import OutputError, check_destination, output_paths, refuse_existing
from negprompt.limits import MAX_SETTINGS_BYTES

if TYPE_CHECKING:
    import numpy as np

    from negprompt.runspec import Generation, RunSpec

DEFAULT_FPS = 16.0  # Wan 2.1 and 2.2 A14B are trained on 16 frames a second
MAX_FPS = 1000.0
MP4_CRF = 18  # x264's constant rate factor: 18 is near transparent, 23 its default
CONTAINERS = {".mp4": "mp4", ".webp": "webp"}
RECORD_FORMAT = 1  # the "negprompt_run" version of the JSON
RECORD_KEYS = {"negprompt_run", "kind", "settings", "infotext", "frames", "fps", "files"}
INSTALL_HINT = "pip install 'negprompt[video]'"


# ---------------------------------------------------------------- paths


@dataclass(frozen=True)
class VideoPaths:
    """The files of a video run written for ``--out``: one video per clip, the JSON, the frames folder."""

    clips: tuple[Path, ...]
    settings: Path
    frames: Path

    def frame(self, clip: int, frame: int, count: int) -> Path:
        """The PNG of ``frame`` (of ``count``) of ``clip``: ``NAME_frames/clip_000/frame_000.png``."""
        digits = max(3, len(str(count - 1)))
        return self.frames / f"clip_{clip:03d}" / f"frame_{frame:0{digits}d}.png"

    def all_files(self) -> list[Path]:
        return [*self.clips, self.settings]


def mp4_encoder() -> str | None:
    """The name of the installed H.264 encoder ("libx264"), or None (see :func:`missing_encoder`)."""
    return None if missing_encoder() else "libx264"


def missing_encoder() -> str:
    """ "" where PyAV with libx264 is installed, else what is missing, for a one-line message."""
    try:
        import av
    except ImportError:
        return "the package 'av' (PyAV) is not installed"
    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # av.codec.codec.UnknownCodecError: an FFmpeg built without it
        return f"the installed PyAV {av.__version__} has no libx264 encoder"
    return ""


def container_for(out: str | Path) -> str:
    """ "mp4" or "webp": the suffix of ``out`` if it names one, else MP4 where an encoder is installed."""
    suffix = Path(out).suffix.lower()
    if suffix in CONTAINERS:
        return CONTAINERS[suffix]
    return "mp4" if mp4_encoder() is not None else "webp"


def video_paths(out: str | Path, seeds: Sequence[int], container: str) -> VideoPaths:
    """``NAME.mp4`` for one clip, ``NAME-s<seed>.mp4`` for several (as images are named), ``NAME.json`` and
    ``NAME_frames/``, all beside ``out`` (whatever its suffix)."""
    out = Path(out)
    base = out.with_suffix(".png")
    clips = [path.with_suffix("." + container) for path in output_paths(base, list(seeds))]
    return VideoPaths(tuple(clips), out.with_suffix(".json"), out.with_name(out.stem + "_frames"))


def check_video_outputs(out: str | Path, seeds: Sequence[int], overwrite: bool = True) -> VideoPaths:
    """The paths of a video run, each checked writable before any work (and, without ``overwrite``, absent);
    ``--out NAME.mp4`` without an MP4 encoder is an error that names the package and the WebP way."""
    missing = missing_encoder() if Path(out).suffix.lower() == ".mp4" else ""
    if missing:
        raise OutputError(
            f"--out {Path(out).name} needs an H.264 encoder: {missing} ({INSTALL_HINT}); "
            f"or give --out {Path(out).with_suffix('.webp').name} for an animated WebP (Pillow)"
        )
    paths = video_paths(out, seeds, container_for(out))
    for path in paths.all_files():
        check_destination(path)
    check_destination(paths.frames, folder=True)
    if not overwrite:
        refuse_existing([*paths.all_files(), *([paths.frames] if paths.frames.exists() else [])])
    return paths


def check_fps(fps: float) -> float:
    """Raises :class:`OutputError` unless ``fps`` is a frame rate in (0, MAX_FPS]."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise OutputError(f"frame rate {fps!r}: give a number of frames a second above 0, at most {MAX_FPS:g}")
    return float(fps)


# ---------------------------------------------------------------- the run's JSON


def run_record(spec: RunSpec, frames: int | None = None, fps: float | None = None, files: dict | None = None) -> dict:
    """The JSON of a run: ``settings`` (what a PNG's ``negprompt`` chunk holds), one infotext per clip or
    image, and for a video its ``frames`` and ``fps``. The infotexts are left out where they would take the
    record past ``MAX_SETTINGS_BYTES`` (a run of thousands of seeds): the settings alone rerun it."""
    record: dict[str, Any] = {"negprompt_run": RECORD_FORMAT, "kind": "image" if frames is None else "video"}
    record["settings"] = spec.to_json()
    if frames is not None:
        record["frames"], record["fps"] = frames, fps
    if files:
        record["files"] = files
    infotext = [spec.infotext(index) for index in range(len(spec.seeds))]
    if len(json.dumps(record)) + sum(len(text) + 8 for text in infotext) < MAX_SETTINGS_BYTES // 2:
        record["infotext"] = infotext
    return record


@dataclass(frozen=True)
class RunRecord:
    """A run read back from its JSON: the settings, and for a video the frame count and rate."""

    settings: RunSpec
    kind: str  # "image" or "video"
    frames: int | None = None
    fps: float | None = None


def read_run_json(path: str | Path) -> RunRecord:
    """The run a ``NAME.json`` written by negprompt describes. Anything else, damaged or hostile (not UTF-8,
    over ``MAX_SETTINGS_BYTES``, not an object, nested too deeply, unknown keys, wrong types), is one
    :class:`~negprompt.runspec.SettingsError` line."""
    from negprompt.runspec import SettingsError

    data = _read_json_object(Path(path), SettingsError)
    unknown = sorted(set(data) - RECORD_KEYS)
    if unknown:
        raise SettingsError(
            f"{path}: unknown key(s) {', '.join(_short(k) for k in unknown[:3])}; a run's JSON has "
            f"{', '.join(sorted(RECORD_KEYS))}"
        )
    if data.get("negprompt_run") != RECORD_FORMAT or data.get("kind") not in ("image", "video"):
        raise SettingsError(
            f'{path} is not a run\'s JSON of this negprompt (it needs "negprompt_run": {RECORD_FORMAT} and '
            '"kind": "image" or "video"); give the NAME.json a negprompt video run wrote'
        )
    settings = _settings_of(path, data.get("settings"), SettingsError)
    frames = fps = None
    if data["kind"] == "video":
        frames, fps = data.get("frames"), data.get("fps")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise SettingsError(f"{path}: 'frames' must be a whole number ≥ 1, got {_short(frames)}")
        try:
            fps = check_fps(fps)
        except OutputError as error:
            raise SettingsError(f"{path}: 'fps': {error}") from None
        if frames != settings.frames:
            raise SettingsError(f"{path}: its settings make {settings.frames} frames, its 'frames' says {frames}")
    return RunRecord(settings, data["kind"], frames, fps)


def _read_json_object(path: Path, error_type: type[Exception]) -> dict:
    """The JSON object in ``path``, read in at most ``MAX_SETTINGS_BYTES`` + 1 bytes; else one line."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_SETTINGS_BYTES + 1)
    except FileNotFoundError:
        raise error_type(f"no such file: {path}") from None
    except IsADirectoryError:
        raise error_type(f"{path} is a folder; give the NAME.json a negprompt run wrote") from None
    except OSError as error:
        raise error_type(f"cannot read {path} ({error.strerror or error})") from None
    if len(raw) > MAX_SETTINGS_BYTES:
        raise error_type(f"{path} is over {MAX_SETTINGS_BYTES} bytes; negprompt writes a run's JSON of less")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise error_type(f"{path} is not UTF-8 text (byte at offset {error.start}); give a run's JSON") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise error_type(f"{path} nests JSON too deeply; give the NAME.json a negprompt run wrote") from None
    except ValueError as error:  # json.JSONDecodeError, and NaN or Infinity
        raise error_type(f"{path} is not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error_type(f"{path} holds a JSON {type(data).__name__}, not an object; give a run's JSON")
    return data


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _settings_of(path: str | Path, settings: object, error_type: type[Exception]) -> RunSpec:
    """The :class:`RunSpec` of a record's ``settings``; a key its ``to_json`` would not write is an error."""
    from negprompt.runspec import RunSpec, SettingsError

    try:
        spec = RunSpec.from_json(settings)  # type: ignore[arg-type]
    except SettingsError as error:
        raise error_type(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise error_type(f"{path}: malformed settings ({type(error).__name__}: {error})") from None
    written = spec.to_json()
    unknown = sorted(key for key in settings if key not in written and settings[key] is not None)  # type: ignore[union-attr]
    if unknown:
        raise error_type(f"{path}: unknown settings key(s) {', '.join(_short(k) for k in unknown[:3])}")
    return spec


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


# ---------------------------------------------------------------- writing


def write_run_json(path: str | Path, record: dict) -> Path:
    """Writes a :func:`run_record` atomically."""
    from negprompt.files import write_json

    return write_json(Path(path), record)


def save_video_generation(generation: Generation, out: str | Path, fps: float = DEFAULT_FPS) -> tuple[list[str], str]:
    """Writes every clip of ``generation`` (pixels (B, F, H, W, 3) in [0, 1]) as a video, its frames as PNGs
    and the run's JSON. The frames folder is written whole beside its name; then the videos and the JSON, all or
    none (``write_atomically``); then the folder is renamed in place of an earlier one
    (``negprompt.files.write_folder_atomically``): an encoder that fails leaves no file of the run. Returns one line per written file or folder (for the terminal) and a note ("" or
    what replaced the MP4)."""
    from negprompt.files import json_text, write_atomically, write_folder_atomically
    from negprompt.runspec import to_uint8

    pixels = generation.pixels
    if pixels.ndim != 5 or pixels.shape[-1] != 3:
        raise ValueError(f"video frames must be shaped (B, F, H, W, 3), got {tuple(pixels.shape)}")
    spec, (clips, count) = generation.spec, pixels.shape[:2]
    if (clips, count) != (len(spec.seeds), spec.frames):
        raise ValueError(f"{clips} clips of {count} frames, but the spec makes {len(spec.seeds)} of {spec.frames}")
    container, note = container_for(out), ""
    if container == "webp" and Path(out).suffix.lower() != ".webp":
        note = f"no MP4 encoder ({missing_encoder()}): wrote animated WebP; {INSTALL_HINT} writes MP4"
    paths = video_paths(out, spec.seeds, container)
    frames = to_uint8(pixels)  # (B, F, H, W, 3) uint8
    files = {"videos": [p.name for p in paths.clips], "frames": paths.frames.name}
    record = run_record(spec, frames=int(count), fps=check_fps(fps), files=files)
    comment = json.dumps(record["settings"] | {"frames": int(count), "fps": record["fps"]})
    jobs: dict[Path, Any] = {clip: _video_job(frames[i], container, fps, comment) for i, clip in enumerate(paths.clips)}
    jobs[paths.settings] = lambda to: Path(to).write_text(json_text(record))
    existed = {path for path in [*jobs, paths.frames] if path.exists()}

    def write_all(folder: Path) -> None:  # the videos and JSON written (and renamed) before the frames folder is
        write_frames(folder, frames, paths)  # renamed in place: a failing encoder leaves neither
        write_atomically(list(jobs), lambda final, temporary: jobs[final](temporary))

    write_folder_atomically(paths.frames, write_all)
    lines = [f"{'replaced' if p in existed else 'wrote'} {p}" for p in paths.clips]
    lines.append(
        f"{'replaced' if paths.frames in existed else 'wrote'} {paths.frames}/ "
        f"({clips} clip{'s' if clips > 1 else ''} × {count} frames, PNG)"
    )
    lines.append(f"{'replaced' if paths.settings in existed else 'wrote'} {paths.settings}")
    return lines, note


def write_frames(folder: Path, frames: np.ndarray, paths: VideoPaths) -> None:
    """Frames (B, F, H, W, 3) uint8 as ``folder/clip_000/frame_000.png`` …"""
    from PIL import Image

    count = frames.shape[1]
    for clip, video in enumerate(frames):
        for index, frame in enumerate(video):
            path = folder / paths.frame(clip, index, count).relative_to(paths.frames)
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(frame).save(path, format="PNG")


def _video_job(frames: np.ndarray, container: str, fps: float, comment: str):
    if container == "mp4":
        return lambda to: encode_mp4(frames, to, fps, comment)
    return lambda to: encode_webp(frames, to, fps, comment)


def encode_mp4(frames: np.ndarray, path: str | Path, fps: float, comment: str = "", crf: int = MP4_CRF) -> None:
    """Frames (F, H, W, 3) uint8 → an H.264 MP4 at ``fps``, ``comment`` in its metadata (PyAV). Even sides
    take 4:2:0 chroma (every player), odd ones 4:4:4 (4:2:0 needs even sides)."""
    from fractions import Fraction

    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as output:
        if comment:
            output.metadata["comment"] = comment
        stream = output.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode(None))  # flush the encoder's delayed frames


def encode_webp(frames: np.ndarray, path: str | Path, fps: float, comment: str = "") -> None:
    """Frames (F, H, W, 3) uint8 → an animated lossless WebP (Pillow), ``comment`` in an XMP packet.
    libwebp merges a frame equal to the one before into its duration: a still clip decodes to fewer frames
    (the PNGs keep every one)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(
        path,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
        lossless=True,
        xmp=xmp_packet(comment) if comment else b"",
    )


XMP_NAMESPACE = "urn:negprompt:run:1"


def xmp_packet(text: str) -> bytes:
    """An XMP packet holding ``text`` as the property ``negprompt:settings`` (XML-escaped)."""
    from xml.sax.saxutils import quoteattr

    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:negprompt="{XMP_NAMESPACE}" negprompt:settings={quoteattr(text)}/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()
