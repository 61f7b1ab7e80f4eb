"""Training the bundled shapes-world model on CPU: seeded, checkpointed, resumable.

The data stream is a pure function of (seed, example index), so a resumed run sees exactly the
examples an uninterrupted run would. Checkpoints hold the weights, their EMA, the optimizer
moments and the torch RNG state, all in one safetensors file (never a pickle) beside a JSON file.

- :mod:`negprompt.shapes.training_config`: what a run is (:class:`TrainConfig`, the learning-rate
  schedule, the batches of images or clips);
- :mod:`negprompt.shapes.checkpoints`: the training folder's files (reading and checking a checkpoint,
  the log, the exported models a run starts from);
- this module: the :class:`Trainer` (model, EMA, optimizer, the loss, the loop, writing checkpoints,
  the export). Its names above are importable from here as before.

``TrainConfig.frames`` > 0 trains the tiny video model (:mod:`negprompt.shapes.video_model`) on clips
(:mod:`negprompt.shapes.clips`) with the same loop; ``frames`` = 0, the default, is the image model,
whose path is unchanged.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from negprompt.files import append_text, json_text, write_atomically, write_folder_atomically, write_json, write_text
from negprompt.models.components import Components
from negprompt.models.declarations import DECLARATIONS_FILE, Declarations
from negprompt.models.saving import save_components
from negprompt.sampling.schedulers import make_scheduler
from negprompt.shapes.checkpoints import (
    LOG_FILE,
    META_FILE,
    MODEL_FOLDER,
    STATE_FILE,
    CheckpointError,
    check_training_folder,
    expected_tensors,
    load_teacher,
    load_weights_from_model_dir,
    log_lines,
    logged_step,
    read_checkpoint,
    weights_sha256,
)
from negprompt.shapes.model import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
)
from negprompt.shapes.regions import NAME as REGION_FINDER
from negprompt.shapes.scene import WORLDS
from negprompt.shapes.training_config import (
    THING_REGIONS,
    TrainConfig,
    batch_of_clips,
    batch_of_examples,
    learning_rate_at,
)
from negprompt.shapes.video_model import build_video_unet, load_image_weights, predict_noise, save_video_model

__all__ = [  # the names importable from here (some live in the modules above)
    "CHECKPOINT_SECONDS",
    "DECLARATIONS",
    "DEFAULT_SAMPLING",
    "LOG_FILE",
    "META_FILE",
    "MODEL_FOLDER",
    "STATE_FILE",
    "THING_REGIONS",
    "CheckpointError",
    "TrainConfig",
    "Trainer",
    "batch_of_clips",
    "batch_of_examples",
    "check_training_folder",
    "duration",
    "learning_rate_at",
    "load_teacher",
    "load_weights_from_model_dir",
    "weights_sha256",
]

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
CHECKPOINT_SECONDS = 300.0  # also checkpoint when this long has passed since the last one (and at Ctrl-C)
ESTIMATE_AFTER_STEPS = 3  # the cost of the rest is measured over this many first steps


def duration(seconds: float) -> str:
    """A duration for people: "45 s", "12 min", "3 h 24 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Trainer:
    """Owns the model, its EMA and the optimizer; ``run`` trains until the sample budget is spent."""

    def __init__(self, config: TrainConfig, out_dir: str | Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        torch.manual_seed(config.seed)
        self.tokenizer = build_tokenizer()
        self.text_encoder = build_text_encoder(config.model, self.tokenizer)
        self.unet = build_video_unet(config.model) if config.frames else build_unet(config.model)
        if config.init_from is not None:  # before the folder exists: a bad source leaves nothing behind
            start_from = load_image_weights if config.frames else load_weights_from_model_dir
            start_from(config.init_from, self.unet, self.text_encoder)
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
        """The ε-prediction loss on one batch; pixels (B, 3, H, W) in [−1, 1] (clips: (B, 3, F, H, W)).

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
        encoded = self.text_encoder(ids)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(pixels.shape, generator=generator)
        noisy = self.scheduler.add_noise(pixels, noise, timesteps)
        if self.config.frames:
            predicted = predict_noise(self.unet, noisy, timesteps, encoded)
        else:
            predicted = self.unet(noisy, timesteps, encoded.last_hidden_state).sample
        squared = (predicted - noise).pow(2)
        if things is not None and self.config.thing_weight != 1.0:
            squared = squared * (1.0 + (self.config.thing_weight - 1.0) * things)
        per_sample = squared.mean(dim=tuple(range(1, squared.ndim)))  # (1, 2, 3) for images
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
        return expected_tensors(self.modules)

    def read_checkpoint(self) -> tuple[dict, TrainConfig, dict[str, torch.Tensor]]:
        """The checkpoint in ``out_dir``, checked whole before anything changes (:func:`read_checkpoint` of
        :mod:`negprompt.shapes.checkpoints`); raises :class:`CheckpointError` in one line."""
        return read_checkpoint(self.out_dir, self.config, self.modules, self.parameters)

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
            kept = [line for line in log_lines(log_path) if logged_step(line) <= self.step]
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
            pixels, captions, things = self._batch()
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

    def _batch(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """The examples of the current step: images, or clips for the video model."""
        cfg = self.config
        start, world = self.step * cfg.batch_size, WORLDS[cfg.world]  # checked by TrainConfig
        if cfg.frames:
            return batch_of_clips(cfg.seed, start, cfg.batch_size, cfg.frames, world)
        return batch_of_examples(cfg.seed, start, cfg.batch_size, world)

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
        if self.config.frames:
            return self._export_video(folder)
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

    def _export_video(self, folder: str | Path) -> Path:
        """The EMA video model in diffusers layout with ``video.json`` (the toolkit's loader, for images,
        does not read it: no ``model_index.json``)."""
        unet, text_encoder = build_video_unet(self.config.model), build_text_encoder(self.config.model, self.tokenizer)
        for name, module in (("unet", unet), ("text", text_encoder)):
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in self.ema.items() if k.startswith(f"{name}.")})
        parts = dict(unet=unet, text_encoder=text_encoder, tokenizer=build_tokenizer(), scheduler=build_scheduler())
        from transformers.utils import logging as transformers_logging

        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # its "Writing model shards" bar
        try:
            return write_folder_atomically(folder, lambda path: save_video_model(parts, self.config.frames, path))
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
