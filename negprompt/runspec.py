"""The validated specification of one run (what the CLI, PNG metadata, study specs and the API share),
and what a run returns."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from negprompt.devices import DEVICE_CHOICES, DTYPES
from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance
from negprompt.guidance.rules.base import GuidanceError, check_scale
from negprompt.limits import MAX_FRAMES, MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS, MAX_VIDEO_BYTES
from negprompt.models.loading import BUNDLED_NAME
from negprompt.sampling.loop import StepInfo
from negprompt.version import __version__

RECORDED_DEVICES = tuple(d for d in DEVICE_CHOICES if d != "auto")
# PNGs written before device and dtype were recorded were all made on the CPU in float32.
LEGACY_DEVICE, LEGACY_DTYPE = "cpu", "float32"


class SettingsError(NegpromptError):
    """Settings that cannot describe a run."""


def check_whole(name: str, value: object, low: int, high: int) -> None:
    """Raises :class:`SettingsError` unless ``value`` is a whole number (not a bool) in ``low``–``high``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise SettingsError(f"{name} must be a whole number in {low}–{high}, got {value!r}")


def check_steps(steps: object) -> None:
    """Raises :class:`SettingsError` unless ``steps`` is a whole number in 1–``MAX_STEPS``."""
    check_whole("steps", steps, 1, MAX_STEPS)


@dataclass(frozen=True)
class RunSpec:
    """Every setting of a generation run; a PNG's metadata holds these plus the image's index.

    ``device`` (cpu | cuda | mps, never auto) and ``dtype`` (float32 | float16 | bfloat16) are the
    ones the images were made with: both change pixels, so both are recorded. So is
    ``rows_per_call``: another split of the UNet's batch sums in another order (float rounding).
    The images of one spec are computed together, so an image's pixels follow from the whole spec
    (all its seeds), which its PNG records.
    """

    guidance: Guidance
    model: str = BUNDLED_NAME
    scheduler: str = "default"
    steps: int = 50
    seeds: tuple[int, ...] = (0,)
    height: int = 512
    width: int = 512
    eta: float = 0.0
    device: str = LEGACY_DEVICE
    dtype: str = LEGACY_DTYPE
    rows_per_call: int | None = None  # split each UNet call in chunks of so many rows (None: whole calls)
    embeddings: tuple[tuple[str, str, str], ...] = ()  # textual inversions loaded: (token, file name, sha256[:10])
    embedded_guidance: float | None = None  # w given to a guidance-distilled model as an input (None: it takes none)
    frames: int = 1  # frames of each video of a video model (Wan); 1: images
    scale_2: float | None = None  # guidance scale of a second expert's steps (Wan 2.2; None: the model has one)

    def __post_init__(self) -> None:
        if isinstance(self.seeds, (str, bytes)) or not hasattr(self.seeds, "__iter__"):
            raise SettingsError(f"seeds must be a list of whole numbers, got {self.seeds!r}")
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in self.seeds):
            raise SettingsError(f"seeds must be whole numbers, got {list(self.seeds)!r}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not 1 <= len(self.seeds) <= MAX_IMAGES:
            raise SettingsError(f"a run makes 1–{MAX_IMAGES} images (one per seed), got {len(self.seeds)}")
        check_steps(self.steps)
        check_whole("height", self.height, 1, MAX_SIDE)
        check_whole("width", self.width, 1, MAX_SIDE)
        outside = [s for s in self.seeds if not 0 <= s <= MAX_SEED]
        if outside:
            raise SettingsError(f"seed {outside[0]} is outside 0–{MAX_SEED} (a 64-bit generator seed)")
        try:
            finite = not isinstance(self.eta, bool) and math.isfinite(self.eta)
        except TypeError:
            finite = False
        if not finite:
            raise SettingsError(f"eta must be a finite number, got {self.eta!r}")
        if self.device not in RECORDED_DEVICES:
            raise SettingsError(f"run device {self.device!r} is not one of {', '.join(RECORDED_DEVICES)}")
        if self.dtype not in DTYPES:
            raise SettingsError(f"run dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if isinstance(self.embeddings, (str, bytes)) or any(
            not isinstance(e, (tuple, list)) or len(e) != 3 or not all(isinstance(x, str) for x in e)
            for e in self.embeddings
        ):
            raise SettingsError(f"embeddings must be (token, file, sha256) triples, got {self.embeddings!r}")
        object.__setattr__(self, "embeddings", tuple(tuple(e) for e in self.embeddings))
        w = self.embedded_guidance
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0):
            raise SettingsError(f"embedded guidance must be a finite number ≥ 0, got {w!r}")
        rows = self.rows_per_call
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise SettingsError(f"rows per UNet call must be a positive whole number, got {rows!r}")
        self._check_video()

    def _check_video(self) -> None:
        """Frames a whole number in 1–MAX_FRAMES whose decoded videos fit MAX_VIDEO_BYTES; a finite second scale."""
        check_whole("frames", self.frames, 1, MAX_FRAMES)
        size = len(self.seeds) * self.frames * self.height * self.width * 3 * 4
        if self.frames > 1 and size > MAX_VIDEO_BYTES:
            raise SettingsError(
                f"{len(self.seeds)} video(s) of {self.frames} frames of {self.width}×{self.height} take "
                f"{size / 2**30:.0f} GiB as float32 frames, over the {MAX_VIDEO_BYTES // 2**30} GiB a run may hold; "
                "give fewer frames, a smaller size or fewer seeds"
            )
        if self.scale_2 is not None:
            try:
                check_scale(self.scale_2, "second guidance scale")
            except GuidanceError as error:
                raise SettingsError(str(error)) from None

    def to_json(self) -> dict:
        record = {
            "negprompt_version": __version__,
            "model": self.model,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "seeds": list(self.seeds),
            "height": self.height,
            "width": self.width,
            "eta": self.eta,
            "device": self.device,
            "dtype": self.dtype,
            "guidance": self.guidance.to_json(),
        }
        if self.rows_per_call is not None:
            record["rows_per_call"] = self.rows_per_call
        if self.embedded_guidance is not None:
            record["embedded_guidance"] = self.embedded_guidance
        if self.frames != 1:
            record["frames"] = self.frames
        if self.scale_2 is not None:
            record["scale_2"] = self.scale_2
        if self.embeddings:
            record["embeddings"] = [{"token": t, "file": f, "sha256": h} for t, f, h in self.embeddings]
        return record

    @classmethod
    def from_json(cls, data: dict) -> "RunSpec":
        """Reads :meth:`to_json`'s dict; older records without device and dtype read as CPU, float32.

        Every field must have its type (a whole number stays a whole number: 2.5 steps is an error,
        not 2); anything else is a :class:`SettingsError` naming the field.
        """
        if not isinstance(data, dict):
            raise SettingsError(f"settings must be a JSON object, got {type(data).__name__}")
        missing = [
            key for key in ("guidance", "model", "scheduler", "steps", "seeds", "height", "width") if key not in data
        ]
        if missing:
            raise SettingsError(f"settings lack the field(s) {', '.join(missing)}")
        for key in ("steps", "height", "width"):
            _expect(data, key, int)
        for key in ("model", "scheduler", "device", "dtype"):
            _expect(data, key, str)
        _expect(data, "eta", (int, float))
        _expect(data, "rows_per_call", int, optional=True)
        _expect(data, "embedded_guidance", (int, float), optional=True)
        _expect(data, "frames", int)
        _expect(data, "scale_2", (int, float), optional=True)
        if not isinstance(data["seeds"], list):
            raise SettingsError(f"settings field 'seeds' must be a list of whole numbers, got {data['seeds']!r}")
        embeddings = data.get("embeddings") or []
        if not isinstance(embeddings, list) or not all(
            isinstance(e, dict) and {"token", "file", "sha256"} <= set(e) for e in embeddings
        ):
            raise SettingsError("settings field 'embeddings' must be a list of {token, file, sha256} objects")
        try:
            guidance = Guidance.from_json(data["guidance"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SettingsError(f"settings field 'guidance' is malformed ({type(error).__name__}: {error})") from None
        return cls(
            guidance=guidance,
            model=data["model"],
            scheduler=data["scheduler"],
            steps=data["steps"],
            seeds=tuple(data["seeds"]),
            height=data["height"],
            width=data["width"],
            eta=float(data.get("eta", 0.0)),
            device=data.get("device", LEGACY_DEVICE),
            dtype=data.get("dtype", LEGACY_DTYPE),
            rows_per_call=data.get("rows_per_call"),
            embeddings=tuple((e["token"], e["file"], e["sha256"]) for e in embeddings),
            embedded_guidance=data.get("embedded_guidance"),
            frames=data.get("frames", 1),
            scale_2=data.get("scale_2"),
        )

    def infotext(self, index: int) -> str:
        """AUTOMATIC1111-style ``parameters`` text for image ``index`` of the batch."""
        g = self.guidance
        lines = [_as_text(g.positive.prompt, index)]
        for term in g.negatives:
            lines.append(f"Negative prompt: {_as_text(term.prompt, index)}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.scheduler}",
            f"CFG scale: {g.scale}",
            f"Seed: {self.seeds[index]}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model}",
            *_second_prompts(g, index),
            *g.infotext_fields(),
        ]
        if self.dtype != LEGACY_DTYPE:
            fields.append(f"Precision: {self.dtype}")
        if self.rows_per_call is not None:
            fields.append(f"Rows per call: {self.rows_per_call}")
        if self.embedded_guidance is not None:
            fields.append(f"Embedded guidance: {self.embedded_guidance}")
        if self.frames != 1:
            fields.append(f"Frames: {self.frames}")
        if self.scale_2 is not None:
            fields.append(f"CFG scale 2: {self.scale_2}")
        if self.embeddings:  # AUTOMATIC1111's field for textual-inversion embeddings
            fields.append(
                'TI hashes: "' + ", ".join(f"{token}: {digest}" for token, _, digest in self.embeddings) + '"'
            )
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _expect(data: dict, key: str, kind, optional: bool = False) -> None:
    """Raises :class:`SettingsError` unless ``data[key]`` (absent is fine) has type ``kind`` (bool never counts)."""
    if key not in data or (optional and data[key] is None):
        return
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SettingsError(f"settings field {key!r} must be {names}, got {value!r}")


def _as_text(prompt: str | tuple[str, ...], index: int) -> str:
    return prompt if isinstance(prompt, str) else prompt[index]


def _second_prompts(guidance: Guidance, index: int) -> list[str]:
    """Infotext fields of the second text encoder's prompts (SDXL), quoted as AUTOMATIC1111 quotes values."""
    named = [("Prompt 2", guidance.positive)] + [
        (f"Negative {i} prompt 2", term) for i, term in enumerate(guidance.negatives, start=1)
    ]
    return [
        f"{name}: {json.dumps(_as_text(term.prompt_2, index), ensure_ascii=False)}"
        for name, term in named
        if term.prompt_2 is not None
    ]


@dataclass
class Generation:
    """Images of one run with the spec that made them; ``trace`` holds each step if asked.

    A video model's run (``spec.frames`` > 1, or any run of a video family) holds videos: ``pixels`` is then
    (B, F, H, W, 3), ``images`` is empty and :attr:`frames` gives each video's frames as images."""

    spec: RunSpec
    pixels: np.ndarray  # (B, H, W, 3) float32 in [0, 1]; videos: (B, F, H, W, 3)
    trace: list[StepInfo] | None = None
    unet_batch_rows: int = 0
    num_steps: int = 0
    negative_stops: dict[str, int | None] = field(default_factory=dict)  # auto-ended negatives' stop steps
    images: list[Image.Image] = field(init=False)

    def __post_init__(self) -> None:
        self.images = [] if self.is_video else [Image.fromarray(to_uint8(p)) for p in self.pixels]

    @property
    def is_video(self) -> bool:
        """Whether the run made videos: ``pixels`` (B, F, H, W, 3)."""
        return self.pixels.ndim == 5

    @property
    def frames(self) -> list[list[Image.Image]]:
        """Each video's frames as images (made on each call); [] for a run of images."""
        return [[Image.fromarray(to_uint8(f)) for f in video] for video in self.pixels] if self.is_video else []


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (pixels * 255).round().astype(np.uint8)
