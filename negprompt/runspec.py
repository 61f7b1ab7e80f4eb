"""The validated specification of one run (what the CLI, PNG metadata, study specs and the API share),
and what a run returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from negprompt.devices import DEVICE_CHOICES, DTYPES
from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance
from negprompt.models.loading import BUNDLED_NAME
from negprompt.sampling.loop import StepInfo
from negprompt.version import __version__

RECORDED_DEVICES = tuple(d for d in DEVICE_CHOICES if d != "auto")
# PNGs written before device and dtype were recorded were all made on the CPU in float32.
LEGACY_DEVICE, LEGACY_DTYPE = "cpu", "float32"


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


class SettingsError(NegpromptError):
    """Settings that cannot describe a run."""


@dataclass(frozen=True)
class RunSpec:
    """Every setting of a generation run; a PNG's metadata holds these plus the image's index.

    ``device`` (cpu | cuda | mps, never auto) and ``dtype`` (float32 | float16 | bfloat16) are the
    ones the images were made with: both change pixels, so both are recorded.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
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

    def to_json(self) -> dict:
        return {
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

    @classmethod
    def from_json(cls, data: dict) -> "RunSpec":
        """Reads :meth:`to_json`'s dict; older records without device and dtype read as CPU, float32."""
        try:
            return cls(
                guidance=Guidance.from_json(data["guidance"]),
                model=data["model"],
                scheduler=data["scheduler"],
                steps=int(data["steps"]),
                seeds=tuple(int(s) for s in data["seeds"]),
                height=int(data["height"]),
                width=int(data["width"]),
                eta=float(data.get("eta", 0.0)),
                device=str(data.get("device", LEGACY_DEVICE)),
                dtype=str(data.get("dtype", LEGACY_DTYPE)),
            )
        except (KeyError, TypeError) as error:
            raise SettingsError(f"settings lack or mistype the field {error}") from None

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
            *g.infotext_fields(),
        ]
        if self.dtype != LEGACY_DTYPE:
            fields.append(f"Precision: {self.dtype}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _as_text(prompt: str | tuple[str, ...], index: int) -> str:
    return prompt if isinstance(prompt, str) else prompt[index]


@dataclass
class Generation:
    """Images of one run with the spec that made them; ``trace`` holds each step if asked."""

    spec: RunSpec
    pixels: np.ndarray  # (B, H, W, 3) float32 in [0, 1]
    trace: list[StepInfo] | None = None
    unet_batch_rows: int = 0
    num_steps: int = 0
    images: list[Image.Image] = field(init=False)

    def __post_init__(self) -> None:
        self.images = [Image.fromarray(to_uint8(p)) for p in self.pixels]


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (pixels * 255).round().astype(np.uint8)
