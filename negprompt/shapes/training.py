"""Training the bundled shapes-world model on CPU: seeded, checkpointed, resumable.

The data stream is a pure function of (seed, example index), so a resumed run sees exactly the
examples an uninterrupted run would. Checkpoints hold the weights, their EMA, the optimizer
moments and the torch RNG state, all in one safetensors file (never a pickle) beside a JSON file.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from negprompt.errors import NegpromptError
from negprompt.files import append_text, json_text, write_atomically, write_json, write_text
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


def _logged_step(line: str) -> float:
    """The step of a training-log line; a line torn by a crash or a full disk counts as never written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
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

    def load_checkpoint(self) -> None:
        meta = json.loads((self.out_dir / META_FILE).read_text())
        saved = TrainConfig.from_json(meta["config"])
        if saved.model != self.config.model or saved.seed != self.config.seed:
            raise ValueError(
                f"checkpoint in {self.out_dir} was trained with another model or seed "
                f"({saved.model}, seed {saved.seed}); use a new --out folder"
            )
        history = meta.get("history", [])
        changed = {k: v for k, v in self.config.to_json().items() if saved.to_json().get(k) != v}
        if changed:  # e.g. a longer budget or another loss weighting from here on: keep a record
            history.append({"from_step": int(meta["step"]), "changed": changed})
            event = {"step": int(meta["step"]), "event": "config changed", "changed": changed}
            append_text(self.out_dir / LOG_FILE, json.dumps(event) + "\n")
        self.history = history
        tensors = load_file(str(self.out_dir / STATE_FILE))
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
            kept = [line for line in log_path.read_text().splitlines() if _logged_step(line) <= self.step]
            write_text(log_path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------ the loop

    def run(
        self,
        progress: bool = True,
        max_seconds: float | None = None,
        on_checkpoint: Callable[["Trainer"], None] | None = None,
    ) -> list[dict]:
        """Trains from ``self.step`` to the end of the sample budget (or ``max_seconds``)."""
        # Tiny gradients become subnormal floats, which make CPU backward passes several times
        # slower (measured here: 6.7 s instead of 1.6 s per batch); flush them to zero while training
        # only: the setting is the processor's, global to the process, and off by default.
        torch.set_flush_denormal(True)
        try:
            return self._train(progress, max_seconds, on_checkpoint)
        finally:
            torch.set_flush_denormal(False)

    def _train(
        self,
        progress: bool,
        max_seconds: float | None,
        on_checkpoint: Callable[["Trainer"], None] | None,
    ) -> list[dict]:
        cfg = self.config
        log: list[dict] = []
        self.unet.train()
        self.text_encoder.train()
        started = time.monotonic()
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
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.total_steps:
                self.save_checkpoint()
                if on_checkpoint is not None:
                    on_checkpoint(self)
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                self.save_checkpoint()  # stop resumably
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
        folder = save_components(components, folder)
        sampling = dict(DEFAULT_SAMPLING)
        if self.config.distill_from is not None:  # one pass per step: CFG's scale 1, w given to the model
            sampling.update(scale=1.0, embedded_guidance=DEFAULT_SAMPLING["scale"])
        write_json(folder / DECLARATIONS_FILE, Declarations.from_json({**sampling, **DECLARATIONS}).to_json(), indent=2)
        return folder
