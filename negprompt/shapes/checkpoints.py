"""The files of a training folder: the checkpoint, the log, and the exported models a run starts from.

A checkpoint is ``state.safetensors`` (weights, their EMA, optimizer moments, the torch RNG state; never
a pickle) beside ``state.json`` (step, config, history); :func:`read_checkpoint` checks one whole before
a resume changes anything. :func:`load_weights_from_model_dir` and :func:`load_teacher` read the exported
model a fine-tune or a distillation starts from. Writing stays with the trainer
(:meth:`negprompt.shapes.training.Trainer.save_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from negprompt.errors import NegpromptError
from negprompt.models.components import Components
from negprompt.models.loading import ModelLoadError, load_components
from negprompt.shapes.training_config import TrainConfig

STATE_FILE = "state.safetensors"
META_FILE = "state.json"
LOG_FILE = "train_log.jsonl"
MODEL_FOLDER = "model"  # the exported EMA model, in the training folder


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


def weights_sha256(model_dir: str | Path) -> str:
    """One hash over the UNet and text-encoder safetensors files of an exported model directory."""
    digest = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        for path in sorted((Path(model_dir) / part).glob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def log_lines(path: Path) -> list[str]:
    """The lines of a training log; a line that is not UTF-8 (damaged) is left out."""
    lines = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return [line for line in lines if line]


def logged_step(line: str) -> float:
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


def expected_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a checkpoint of this model must hold (optimizer moments aside)."""
    shapes = {"rng.torch": tuple(torch.get_rng_state().shape)}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            shapes[f"model.{name}.{key}"] = shapes[f"ema.{name}.{key}"] = tuple(value.shape)
    return shapes


def read_checkpoint(
    out_dir: Path, config: TrainConfig, modules: dict[str, torch.nn.Module], parameters: list[torch.nn.Parameter]
) -> tuple[dict, TrainConfig, dict[str, torch.Tensor]]:
    """The checkpoint in ``out_dir`` of a run of ``config`` training ``modules``, checked whole before anything changes: ``state.json`` (its step,
    config and history), ``state.safetensors`` (every tensor of this model, its EMA, the RNG state,
    optimizer moments of the parameters' shapes). Raises :class:`CheckpointError` in one line."""
    meta_path, state_path = out_dir / META_FILE, out_dir / STATE_FILE
    restart = f"delete {META_FILE} and {STATE_FILE} to train from the start, or use a new --out folder"
    check_training_folder(out_dir)
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
    if saved.model != config.model or saved.seed != config.seed or saved.frames != config.frames:
        raise CheckpointError(
            f"checkpoint in {out_dir} was trained with another model or seed (seed {saved.seed}); "
            "use a new --out folder"
        )
    if not state_path.exists():
        raise CheckpointError(
            f"{out_dir} holds {META_FILE} but no {STATE_FILE}: the checkpoint is incomplete; restore it, or {restart}"
        )
    try:
        tensors = load_file(str(state_path))
    except SafetensorError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{state_path} is not a safetensors checkpoint ({first}); {restart}") from None
    expected = expected_tensors(modules)
    integral = {  # buffers of whole numbers, if a module has any (the shapes model has none)
        f"{kind}.{name}.{key}"
        for name, module in modules.items()
        for key, value in module.state_dict().items()
        if not value.is_floating_point()
        for kind in ("model", "ema")
    }
    optimizer = {
        f"optim.{index}.{slot}": shape
        for index, param in enumerate(parameters)
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
