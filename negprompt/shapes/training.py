"""Training the bundled shapes-world model on CPU: seeded, checkpointed, resumable.

The data stream is a pure function of (seed, example index), so a resumed run sees exactly the
examples an uninterrupted run would. Checkpoints hold the weights, their EMA, the optimizer
moments and the torch RNG state, all in one safetensors file (never a pickle) beside a JSON file.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from negprompt.errors import NegpromptError
from negprompt.files import append_text, json_text, write_atomically, write_folder_atomically, write_json, write_text
from negprompt.models.components import Components
from negprompt.models.declarations import DECLARATIONS_FILE, Declarations
from negprompt.models.loading import ModelLoadError, load_components
from negprompt.models.saving import save_components
from negprompt.sampling.schedulers import make_scheduler
from negprompt.shapes.model import (
    ShapesModelConfig,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
)
from negprompt.shapes.regions import NAME as REGION_FINDER
from negprompt.shapes.scene import WORLDS, World, sample_example

# The bundled model's negprompt.json. Scale 5: chosen after the fine-tune that keeps things apart
# (docs/training.md; 24 images per evaluation row at scales 5, 7.5, 10, 14): every compositional row
# held at 5, while at 10–14 the negative "blurry" over-sharpened striped objects (shapes 75–88 %). The
# model before it needed 14 for the negative "a hat" to remove enough hats.
DEFAULT_SAMPLING = {"scheduler": "euler-a", "steps": 20, "scale": 5.0}
# What else the exported model's negprompt.json declares: the region finder of the world's things
# (negprompt.analysis.regions; the entry point of negprompt.shapes.regions) and the demo's rows of
# (prompt, negative). Most rows remove a hat; "blurry" shows what a quality negative does.
# "max_sigma": the cosine schedule's σ grows without bound near t = 1000 (σ = 13 at 20 steps' first
# timestep, 36 at 50, 80 at 100, 214 at 200 with leading spacing) and the first step multiplies the
# guided ε's error by σ: at σ ≤ 36 none of 16 images broke, at σ 80–107 (100–125 steps) 2–5 of 16 came
# out flat red or white (docs/training.md). Runs whose first σ exceeds 40 are refused.
DECLARATIONS = {
    "region_finder": REGION_FINDER,
    "max_sigma": 40.0,
    "demo_pairs": [
        ["a red circle", "a hat"],
        ["a blue square", "a hat"],
        ["a green triangle", "blurry"],
        ["a purple circle", "a hat"],
    ],
}
STATE_FILE = "state.safetensors"
META_FILE = "state.json"
LOG_FILE = "train_log.jsonl"
MODEL_FOLDER = "model"  # the exported EMA model, in the training folder
CHECKPOINT_SECONDS = 300.0  # also checkpoint when this long has passed since the last one (and at Ctrl-C)
ESTIMATE_AFTER_STEPS = 3  # the cost of the rest is measured over this many first steps


def duration(seconds: float) -> str:
    """A duration for people: "45 s", "12 min", "3 h 24 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class CheckpointError(NegpromptError):
    """A training folder whose checkpoint cannot be resumed: damaged, incomplete, or of another run."""


def check_training_folder(out_dir: str | Path) -> None:
    """Refuses a training folder whose files are not what training writes there (a folder where a file
    goes, or the reverse), before any work: training would fail at its first checkpoint or its export."""
    out_dir = Path(out_dir)
    for name, folder in ((STATE_FILE, False), (META_FILE, False), (LOG_FILE, False), (MODEL_FOLDER, True)):
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and path.is_dir() != folder:
            kind = "a folder" if path.is_dir() else "not a folder"
            raise CheckpointError(
                f"{path} is {kind}; training writes its {name} there: move it away or use a new --out"
            )


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


def weights_sha256(model_dir: str | Path) -> str:
    """One hash over the UNet and text-encoder safetensors files of an exported model directory."""
    digest = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        for path in sorted((Path(model_dir) / part).glob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _log_lines(path: Path) -> list[str]:
    """The lines of a training log; a line that is not UTF-8 (damaged) is left out."""
    lines = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return [line for line in lines if line]


def _logged_step(line: str) -> float:
    """The step of a training-log line; a line torn by a crash or a full disk counts as never written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return float("inf")


def load_weights_from_model_dir(model_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Copies an exported model's weights (read by the model loader) into freshly built modules."""
    try:
        source = load_components(model_dir)
    except ModelLoadError as error:
        raise NegpromptError(f"--init-from {model_dir}: not an exported model ({error})") from None
    for module, loaded in ((unet, source.unet), (text_encoder, source.text_encoder)):
        try:
            module.load_state_dict(loaded.state_dict())
        except RuntimeError as error:  # shapes or names differ
            first = str(error).strip().splitlines()[0]
            raise NegpromptError(f"--init-from {model_dir}: weights do not fit this model config ({first})") from None


def load_teacher(model_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> Components:
    """The frozen teacher of a distillation; its weights are copied into the student, whose guidance
    input (``time_embedding.cond_proj``) starts at zero, so the student starts as the teacher's ε_y."""
    try:
        teacher = load_components(model_dir)
    except ModelLoadError as error:
        raise NegpromptError(f"--distill-from {model_dir}: not an exported model ({error})") from None
    try:
        text_encoder.load_state_dict(teacher.text_encoder.state_dict())
        missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise NegpromptError(f"--distill-from {model_dir}: weights do not fit this model config ({first})") from None
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise NegpromptError(
            f"--distill-from {model_dir}: the student must be the teacher plus a guidance input "
            f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
        )
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.zero_()
    return teacher.eval()


class Trainer:
    """Owns the model, its EMA and the optimizer; ``run`` trains until the sample budget is spent."""

    def __init__(self, config: TrainConfig, out_dir: str | Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        torch.manual_seed(config.seed)
        self.tokenizer = build_tokenizer()
        self.text_encoder = build_text_encoder(config.model, self.tokenizer)
        self.unet = build_unet(config.model)
        if config.init_from is not None:  # before the folder exists: a bad source leaves nothing behind
            load_weights_from_model_dir(config.init_from, self.unet, self.text_encoder)
        self.teacher: Components | None = None
        if config.distill_from is not None:
            self.teacher = load_teacher(config.distill_from, self.unet, self.text_encoder)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.scheduler = build_scheduler()
        self.modules = {"unet": self.unet, "text": self.text_encoder}
        self.ema = {
            f"{name}.{key}": value.detach().clone()
            for name, module in self.modules.items()
            for key, value in module.state_dict().items()
        }
        self.parameters = [p for module in self.modules.values() for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.step = 0
        self.interrupted = False  # set by run when a Ctrl-C or SIGTERM stopped it (after a checkpoint)
        self.history: list[dict] = []  # config changes on resume: [{"from_step", "changed"}]
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.snr = alphas_cumprod / (1 - alphas_cumprod)

    # ------------------------------------------------------------ one step

    def loss_on(
        self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator, things: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ε-prediction loss on one batch; pixels (B, 3, H, W) in [−1, 1].

        Pixels covered by a removable thing (``things``, (B, 1, H, W) in [0, 1]) weigh
        ``thing_weight`` times more: a hat is 4 % of the image, so without this its words are
        learned last (measured: after 64 k samples "with a hat" changed nothing while colors
        were right in 100 % of images).
        """
        if self.teacher is not None:
            return self.distillation_loss(pixels, captions, generator, things)
        batch = pixels.shape[0]
        drop = torch.rand(batch, generator=generator) < self.config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        text = self.text_encoder(ids).last_hidden_state
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(pixels.shape, generator=generator)
        noisy = self.scheduler.add_noise(pixels, noise, timesteps)
        predicted = self.unet(noisy, timesteps, text).sample
        squared = (predicted - noise).pow(2)
        if things is not None and self.config.thing_weight != 1.0:
            squared = squared * (1.0 + (self.config.thing_weight - 1.0) * things)
        per_sample = squared.mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma > 0:
            snr = self.snr[timesteps]
            per_sample = per_sample * torch.clamp(snr, max=self.config.min_snr_gamma) / snr
        return per_sample.mean()

    def distillation_loss(
        self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator, things: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The student's one-pass ε(x_t, y, w) against the teacher's ε_∅ + w(ε_y − ε_∅) (eq. (1)), w uniform in
        [guidance_min, guidance_max] per example; the same noise, timesteps and caption dropout as :meth:`loss_on`."""
        from negprompt.models.conditioning import guidance_embedding

        cfg, teacher = self.config, self.teacher
        assert teacher is not None
        batch = pixels.shape[0]
        drop = torch.rand(batch, generator=generator) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(pixels.shape, generator=generator)
        scales = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(batch, generator=generator)
        noisy = self.scheduler.add_noise(pixels, noise, timesteps)

        def ids(texts: list[str]) -> torch.Tensor:
            return self.tokenizer(
                texts, padding="max_length", max_length=self.tokenizer.model_max_length, return_tensors="pt"
            ).input_ids

        with torch.no_grad():
            both = torch.cat([ids(captions), ids([""] * batch)])
            text = teacher.text_encoder(both).last_hidden_state
            eps = teacher.unet(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), text).sample
            eps_cond, eps_uncond = eps.chunk(2)
            target = eps_uncond + scales[:, None, None, None] * (eps_cond - eps_uncond)
        dim = cfg.model.guidance_embedding_dim
        embedded = torch.cat([guidance_embedding(float(w), dim) for w in scales])
        predicted = self.unet(
            noisy, timesteps, self.text_encoder(ids(captions)).last_hidden_state, timestep_cond=embedded
        )
        squared = (predicted.sample - target).pow(2)
        if things is not None and cfg.thing_weight != 1.0:
            squared = squared * (1.0 + (cfg.thing_weight - 1.0) * things)
        return squared.mean()

    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, module in self.modules.items():
                for key, value in module.state_dict().items():
                    self.ema[f"{name}.{key}"].lerp_(value, 1 - decay)

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Writes weights, EMA, optimizer moments and RNG state atomically."""
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                tensors[f"model.{name}.{key}"] = value.contiguous()
        for key, value in self.ema.items():
            tensors[f"ema.{key}"] = value.contiguous()
        for index, param in enumerate(self.parameters):
            state = self.optimizer.state.get(param)
            if state:
                for slot in ("exp_avg", "exp_avg_sq", "step"):
                    tensors[f"optim.{index}.{slot}"] = torch.as_tensor(state[slot]).contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"step": self.step, "config": self.config.to_json(), "history": self.history}

        def write_one(final: Path, temporary: Path) -> None:
            if final.name == STATE_FILE:
                save_file(tensors, str(temporary))
            else:
                temporary.write_text(json_text(meta, indent=2))

        write_atomically([self.out_dir / STATE_FILE, self.out_dir / META_FILE], write_one)

    def _expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor a checkpoint of this model must hold (optimizer moments aside)."""
        shapes = {"rng.torch": tuple(torch.get_rng_state().shape)}
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                shapes[f"model.{name}.{key}"] = shapes[f"ema.{name}.{key}"] = tuple(value.shape)
        return shapes

    def read_checkpoint(self) -> tuple[dict, TrainConfig, dict[str, torch.Tensor]]:
        """The checkpoint in ``out_dir``, checked whole before anything changes: ``state.json`` (its step,
        config and history), ``state.safetensors`` (every tensor of this model, its EMA, the RNG state,
        optimizer moments of the parameters' shapes). Raises :class:`CheckpointError` in one line."""
        meta_path, state_path = self.out_dir / META_FILE, self.out_dir / STATE_FILE
        restart = f"delete {META_FILE} and {STATE_FILE} to train from the start, or use a new --out folder"
        check_training_folder(self.out_dir)
        try:
            meta = json.loads(meta_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError):
            raise CheckpointError(
                f"{meta_path} is not the JSON training writes (a damaged checkpoint); {restart}"
            ) from None
        step = meta.get("step") if isinstance(meta, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"{meta_path} holds no step number (a damaged checkpoint); {restart}")
        if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("history", []), list):
            raise CheckpointError(f"{meta_path} holds no training config and history (a damaged checkpoint); {restart}")
        try:
            saved = TrainConfig.from_json(meta["config"])
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{meta_path}: its config is not a training config ({first}); {restart}") from None
        if step > saved.total_steps:
            raise CheckpointError(f"{meta_path}: step {step} is beyond its run's {saved.total_steps} steps; {restart}")
        if saved.model != self.config.model or saved.seed != self.config.seed:
            raise CheckpointError(
                f"checkpoint in {self.out_dir} was trained with another model or seed (seed {saved.seed}); "
                "use a new --out folder"
            )
        if not state_path.exists():
            raise CheckpointError(
                f"{self.out_dir} holds {META_FILE} but no {STATE_FILE}: the checkpoint is incomplete; restore it, or {restart}"
            )
        try:
            tensors = load_file(str(state_path))
        except SafetensorError as error:
            first = str(error).splitlines()[0]
            raise CheckpointError(f"{state_path} is not a safetensors checkpoint ({first}); {restart}") from None
        expected = self._expected_tensors()
        integral = {  # buffers of whole numbers, if a module has any (the shapes model has none)
            f"{kind}.{name}.{key}"
            for name, module in self.modules.items()
            for key, value in module.state_dict().items()
            if not value.is_floating_point()
            for kind in ("model", "ema")
        }
        optimizer = {
            f"optim.{index}.{slot}": shape
            for index, param in enumerate(self.parameters)
            for slot, shape in (("exp_avg", tuple(param.shape)), ("exp_avg_sq", tuple(param.shape)), ("step", ()))
        }
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected) - set(optimizer))
        if missing or unexpected:
            raise CheckpointError(
                f"{state_path} is not a checkpoint of this model: {len(missing)} of its {len(expected)} tensors missing"
                + (f" (first {missing[0]})" if missing else "")
                + f", {len(unexpected)} unexpected"
                + (f" (first {unexpected[0][:60]})" if unexpected else "")
                + f"; {restart}"
            )
        for key, tensor in tensors.items():
            shape = expected.get(key, optimizer.get(key))
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"{state_path}: {key} has shape {tuple(tensor.shape)}, not {shape}; {restart}")
            if key == "rng.torch" and tensor.dtype != torch.uint8:
                raise CheckpointError(f"{state_path}: rng.torch is {tensor.dtype}, not torch.uint8; {restart}")
            if key != "rng.torch" and tensor.is_floating_point() != (key not in integral):
                raise CheckpointError(f"{state_path}: {key} is {tensor.dtype}, not the model's kind; {restart}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{state_path}: {key} holds values that are not finite; {restart}")
        moments = {key.rsplit(".", 1)[0] for key in tensors if key.startswith("optim.")}
        for prefix in moments:
            if any(f"{prefix}.{slot}" not in tensors for slot in ("exp_avg", "exp_avg_sq", "step")):
                raise CheckpointError(f"{state_path}: {prefix} lacks one of exp_avg, exp_avg_sq, step; {restart}")
        return meta, saved, tensors

    def load_checkpoint(self) -> None:
        """Resumes from the checkpoint in ``out_dir`` (:meth:`read_checkpoint` checks it first: nothing
        changes, the log included, unless the whole checkpoint is good)."""
        meta, saved, tensors = self.read_checkpoint()
        for name, module in self.modules.items():
            prefix = f"model.{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            for key in module.state_dict():
                self.ema[f"{name}.{key}"] = tensors[f"ema.{name}.{key}"].clone()
        for index, param in enumerate(self.parameters):
            if f"optim.{index}.exp_avg" in tensors:
                self.optimizer.state[param] = {
                    slot: tensors[f"optim.{index}.{slot}"].clone() for slot in ("exp_avg", "exp_avg_sq", "step")
                }
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        log_path = self.out_dir / LOG_FILE
        if log_path.exists():  # drop log lines written after the checkpoint (they will be redone)
            kept = [line for line in _log_lines(log_path) if _logged_step(line) <= self.step]
            write_text(log_path, "".join(line + "\n" for line in kept))
        history = list(meta.get("history", []))
        changed = {k: v for k, v in self.config.to_json().items() if saved.to_json().get(k) != v}
        if changed:  # e.g. a longer budget or another loss weighting from here on: keep a record
            history.append({"from_step": self.step, "changed": changed})
            event = {"step": self.step, "event": "config changed", "changed": changed}
            append_text(log_path, json.dumps(event) + "\n")
        self.history = history

    # ------------------------------------------------------------ the loop

    def run(
        self,
        progress: bool = True,
        max_seconds: float | None = None,
        on_checkpoint: Callable[["Trainer"], None] | None = None,
        checkpoint_seconds: float | None = CHECKPOINT_SECONDS,
        say: Callable[[str], None] | None = None,
    ) -> list[dict]:
        """Trains from ``self.step`` to the end of the sample budget (or ``max_seconds``).

        A checkpoint every ``checkpoint_every`` steps, when ``checkpoint_seconds`` have passed since the
        last one, at the end, and — run on the main thread — at Ctrl-C (SIGINT) or SIGTERM: the step in
        progress ends, its checkpoint is written, and the run stops with ``self.interrupted`` set (a second
        Ctrl-C stops at once, keeping the checkpoint before). ``say``: where the measured cost goes, once,
        after the first steps."""
        # Tiny gradients become subnormal floats, which make CPU backward passes several times
        # slower (measured here: 6.7 s instead of 1.6 s per batch); flush them to zero while training
        # only: the setting is the processor's, global to the process, and off by default.
        torch.set_flush_denormal(True)
        self.interrupted = False
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {}
        if threading.current_thread() is threading.main_thread():

            def stop_after_this_step(number, frame) -> None:
                self.interrupted = True
                for each in handled:  # a second signal acts at once
                    signal.signal(each, previous[each])

            previous = {each: signal.signal(each, stop_after_this_step) or signal.SIG_DFL for each in handled}
        try:
            return self._train(progress, max_seconds, on_checkpoint, checkpoint_seconds, say)
        finally:
            torch.set_flush_denormal(False)
            for each, handler in previous.items():
                signal.signal(each, handler)

    def _train(
        self,
        progress: bool,
        max_seconds: float | None,
        on_checkpoint: Callable[["Trainer"], None] | None,
        checkpoint_seconds: float | None,
        say: Callable[[str], None] | None,
    ) -> list[dict]:
        cfg = self.config
        log: list[dict] = []
        self.unet.train()
        self.text_encoder.train()
        started = last_checkpoint = time.monotonic()
        first_step = self.step
        if self.step == 0:  # a fresh start: lines of an attempt that never reached a checkpoint go
            (self.out_dir / LOG_FILE).unlink(missing_ok=True)
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        running = []
        while self.step < cfg.total_steps:
            lr = learning_rate_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            pixels, captions, things = batch_of_examples(
                cfg.seed,
                self.step * cfg.batch_size,
                cfg.batch_size,
                WORLDS[cfg.world],  # checked by TrainConfig
            )
            # Noise, timesteps and caption dropout of step k come from a generator seeded by (seed, k):
            # a resumed run draws exactly what an uninterrupted one would.
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
            loss = self.loss_on(pixels, captions, generator, things)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            self.step += 1
            self._update_ema()
            running.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(running[-50:]):.4f}", lr=f"{lr:.2e}")
            if say is not None and self.step - first_step == ESTIMATE_AFTER_STEPS and self.step < cfg.total_steps:
                per_step = (time.monotonic() - started) / ESTIMATE_AFTER_STEPS
                left = cfg.total_steps - self.step
                say(
                    f"{per_step:.2f} s a step over the first {ESTIMATE_AFTER_STEPS}: about {duration(per_step * left)} for the {left} steps left"
                )
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                entry = {
                    "step": self.step,
                    "samples": self.step * cfg.batch_size,
                    "loss": float(np.mean(running)),
                    "lr": lr,
                    "seconds": round(time.monotonic() - started, 1),
                }
                running = []
                log.append(entry)
                append_text(self.out_dir / LOG_FILE, json.dumps(entry) + "\n")
            now = time.monotonic()
            stop = self.interrupted or (max_seconds is not None and now - started > max_seconds)
            due = checkpoint_seconds is not None and now - last_checkpoint >= checkpoint_seconds
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps or stop or due:
                self.save_checkpoint()
                last_checkpoint = time.monotonic()
                if on_checkpoint is not None:
                    on_checkpoint(self)
            if stop:  # resumably: the checkpoint is of this step
                break
        bar.close()
        return log

    # ------------------------------------------------------------ export

    def ema_components(self) -> Components:
        """The model with EMA weights, as components ready to sample or save."""
        tokenizer = build_tokenizer()
        text_encoder = build_text_encoder(self.config.model, tokenizer)
        unet = build_unet(self.config.model)
        for name, module in (("unet", unet), ("text", text_encoder)):
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in self.ema.items() if k.startswith(prefix)})
        components = Components(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=build_scheduler())
        return components.eval()

    def export(self, folder: str | Path) -> Path:
        """Saves the EMA model as a diffusers-style directory, with its sampling defaults and declarations.

        The scheduler folder holds Euler ancestral (same noise schedule as training): measured on
        the first checkpoints, deterministic samplers (DDIM, DPM++) left visible noise in the
        images that stochastic ones removed.
        """
        components = self.ema_components()
        components.scheduler = make_scheduler(DEFAULT_SAMPLING["scheduler"], components.scheduler)
        sampling = dict(DEFAULT_SAMPLING)
        if self.config.distill_from is not None:  # one pass per step: CFG's scale 1, w given to the model
            sampling.update(scale=1.0, embedded_guidance=DEFAULT_SAMPLING["scale"])
        declarations = Declarations.from_json({**sampling, **DECLARATIONS}).to_json()

        def write_into(temporary: Path) -> None:
            from transformers.utils import logging as transformers_logging

            shown = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()  # its "Writing model shards" bar: noise for 18 MB
            try:
                save_components(components, temporary)
            finally:
                if shown:
                    transformers_logging.enable_progress_bar()
            write_json(temporary / DECLARATIONS_FILE, declarations, indent=2)

        # Written whole beside its name, then renamed in: an interrupted export leaves the old model or
        # none, and every file gets the umask's mode (safetensors writes its files 0600).
        return write_folder_atomically(folder, write_into)
