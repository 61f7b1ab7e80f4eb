"""What a training run is: its settings, its learning-rate schedule and the batches it draws.

:class:`TrainConfig` is saved in every checkpoint and compared on resume; the data stream is a pure
function of (seed, example index), so a resumed run sees exactly the examples an uninterrupted run
would: images of :mod:`negprompt.shapes.scene`, or clips of :mod:`negprompt.shapes.clips` for the video
model (``frames`` > 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from negprompt.errors import NegpromptError
from negprompt.shapes.clips import check_frame_count, render_clip_with_things, sample_clip_example
from negprompt.shapes.model import ShapesModelConfig
from negprompt.shapes.scene import WORLDS, World, sample_example


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    samples: int = 160_000  # total training examples the run will see
    batch_size: int = 32
    learning_rate: float = 8e-4
    warmup_steps: int = 300
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # share of empty captions, for classifier-free guidance
    # Min-SNR-γ weighting (Hang et al. 2023); 0 = the plain ε loss. Tried with γ = 5 first: after 35 k
    # samples, deterministic samplers (DDIM, DPM++) left visible noise, since it weights the
    # low-noise steps by min(SNR, γ)/SNR ≈ 0.005; the plain loss does not starve them.
    min_snr_gamma: float = 0.0
    thing_weight: float = 1.0  # loss weight of the removable things' pixels (see Trainer.loss_on)
    checkpoint_every: int = 250  # optimizer steps
    log_every: int = 25
    # Start from an exported model directory (its weights become the weights and the EMA) instead of
    # a random initialisation: a fine-tune. Recorded with the file hash of its weights.
    init_from: str | None = None
    init_sha256: str | None = None
    world: str = "v1"  # the version of the shapes world the examples come from (scene.WORLDS)
    # Guidance distillation (Meng et al. 2023, stage one): a student that takes the guidance scale w
    # as an input learns the teacher's ε_∅ + w(ε_y − ε_∅) in one pass, w uniform in the range. The
    # student starts from the teacher's weights (its guidance input at zero); recorded with the hash.
    distill_from: str | None = None
    distill_sha256: str | None = None
    guidance_min: float = 1.0
    guidance_max: float = 10.0
    # 0: images. 4k + 1 (5, 9, 17, …): the tiny video model on clips of that many frames
    # (negprompt.shapes.clips, negprompt.shapes.video_model; docs/video-ground-truth.md); a batch is then
    # ``batch_size`` clips and ``samples`` counts clips.
    frames: int = 0
    model: ShapesModelConfig = field(default_factory=ShapesModelConfig)

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "learning_rate", "thing_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise NegpromptError(f"training {name.replace('_', ' ')} must be a positive number, got {value}")
        if self.world not in WORLDS:
            raise NegpromptError(f"unknown world version {self.world!r}; known: {', '.join(WORLDS)}")
        if self.distill_from is not None:
            if self.model.guidance_embedding_dim <= 0:
                raise NegpromptError(
                    "a distilled student needs a guidance input: give the model a guidance embedding width"
                )
            if self.init_from is not None:
                raise NegpromptError("distillation starts from the teacher's weights: give no --init-from with it")
        if not (math.isfinite(self.guidance_min) and math.isfinite(self.guidance_max)) or not (
            0 <= self.guidance_min < self.guidance_max
        ):
            raise NegpromptError(f"guidance range must be 0 ≤ low < high, got {self.guidance_min}:{self.guidance_max}")
        if self.frames:
            self._check_video()

    def _check_video(self) -> None:
        """The video model: 4k + 1 frames; its time embedding's extra input carries the pooled text, so it
        takes no guidance input and is not distilled."""
        try:
            check_frame_count(self.frames)
        except ValueError as error:
            raise NegpromptError(f"--frames: {error} (0 trains the image model)") from None
        if self.distill_from is not None or self.model.guidance_embedding_dim:
            raise NegpromptError("the video model is not distilled: give no --distill-from with --frames")

    @property
    def total_steps(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data.setdefault("thing_weight", 1.0)  # checkpoints from before the field trained without it
        data.setdefault("init_from", None)
        data.setdefault("init_sha256", None)
        data.setdefault("world", "v1")  # checkpoints from before the field were trained on v1
        for key, default in (
            ("distill_from", None),
            ("distill_sha256", None),
            ("guidance_min", 1.0),
            ("guidance_max", 10.0),
            ("frames", 0),  # checkpoints from before the field trained the image model
        ):
            data.setdefault(key, default)
        model = ShapesModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("model").items()})
        return cls(model=model, **data)


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from the peak to ``final_lr_fraction`` of it."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.learning_rate * (config.final_lr_fraction + (1 - config.final_lr_fraction) * cosine)


THING_REGIONS = ("hat", "sun", "striped")


def batch_of_examples(
    seed: int, start: int, count: int, world: World = WORLDS["v1"]
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Examples ``start … start+count−1`` of the stream.

    Returns images (count, 3, 32, 32) in [−1, 1], captions, and the coverage (count, 1, 32, 32) in
    [0, 1] of the removable things with a region (hat, sun, stripes) — for the loss weighting.
    """
    images, captions, things = [], [], []
    for index in range(start, start + count):
        _, rendering, caption = sample_example(seed, index, world)
        images.append(rendering.image)
        captions.append(caption)
        coverage = np.zeros(rendering.image.shape[:2])
        for name in THING_REGIONS:
            if name in rendering.regions:
                coverage = coverage + rendering.regions[name]
        things.append(np.clip(coverage, 0.0, 1.0))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, captions, torch.from_numpy(np.stack(things)).float()[:, None]


def batch_of_clips(
    seed: int, start: int, count: int, frames: int, world: World = WORLDS["v1"]
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Clips ``start … start+count−1`` of the clip stream: frames (count, 3, F, 32, 32) in [−1, 1] (the
    layout of diffusers' video UNets), captions, and the things' coverage (count, 1, F, 32, 32)."""
    clips, captions, things = [], [], []
    for index in range(start, start + count):
        clip, caption = sample_clip_example(seed, index, frames, world)
        pixels, coverage = render_clip_with_things(clip)
        clips.append(pixels)
        captions.append(caption)
        things.append(coverage)
    pixels = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return pixels, captions, torch.from_numpy(np.stack(things)).float()[:, None]
