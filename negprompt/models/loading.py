"""Loading a model offline: a diffusers directory, a model id in the local HF cache, or the bundled model.

Only safetensors weights are read. A folder that holds only pickled weights (``.bin``, ``.ckpt``,
``.pt``, ``.pth``) is refused: unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from safetensors import SafetensorError

from negprompt.errors import NegpromptError
from negprompt.limits import MAX_CONFIG_BYTES, MAX_TRAIN_TIMESTEPS
from negprompt.models.components import Components
from negprompt.models.declarations import DECLARATIONS_FILE, Declarations, DeclarationsError
from negprompt.models.families import FAMILIES, family_for_index
from negprompt.models.family import ModelFamily

BUNDLED_NAME = "shapes"
BUNDLED_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes-model"
DISTILLED_NAME = "shapes-distilled"  # the bundled model guidance-distilled: scale as an input, one pass a step
BUNDLED_MODELS = {
    BUNDLED_NAME: BUNDLED_PATH,
    DISTILLED_NAME: BUNDLED_PATH.parent / "shapes-distilled",
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CONFIG_FILES = ("config.json", "scheduler_config.json")  # a part's own configuration (models; schedulers)


class ModelLoadError(NegpromptError):
    """A model that cannot be loaded offline, with the reason."""


def resolve_model_path(source: str | Path | None) -> Path:
    """The local directory for ``source``: None/"shapes" → the bundled model ("shapes-distilled": its
    guidance-distilled student); a path; or a cached id."""
    if source is None or str(source) in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[str(source or BUNDLED_NAME)]
        if not (bundled / "model_index.json").exists():
            raise ModelLoadError(f"the bundled model is missing from {bundled}; reinstall negprompt")
        return bundled
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelLoadError(
                f"{path} is a single file; negprompt loads diffusers directories "
                "(model_index.json with unet/, text_encoder/, tokenizer/, scheduler/ folders)"
            )
        return path
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError):
            raise ModelLoadError(
                f"model id {text!r} is not in the local Hugging Face cache and negprompt never downloads; "
                "download it where a network is available, or give a local directory"
            ) from None
    raise ModelLoadError(
        f"no model at {text!r}: give a diffusers directory, a model id in the local Hugging Face cache, "
        f"or {BUNDLED_NAME!r} for the bundled model ({DISTILLED_NAME!r}: its guidance-distilled student)"
    )


def _check_safetensors(folder: Path, part: str) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ModelLoadError(
            f"{part} holds only pickled weights ({', '.join(sorted(pickled))}); negprompt reads safetensors "
            "only, because loading a pickle can run arbitrary code: convert the weights to safetensors first"
        )
    raise ModelLoadError(f"{part} folder {folder} has no .safetensors weights")


def _class_from(library: str, name: str, base: type) -> type:
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(module, name, None) if module is not None else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ModelLoadError(f"model_index.json names an unsupported class {library}.{name}")
    return cls


def load_components(
    source: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Components:
    """Loads the parts of ``source``'s model family (UNet, text encoder, tokenizer, scheduler and, for
    latent models, the VAE) in ``dtype`` on ``device``, without any network access.

    Every part's configuration is read and checked first (:func:`read_json_object`, :func:`check_scheduler_config`),
    and a weight file whose keys are not the part's (missing, unexpected or of another shape) is refused with
    the counts (:func:`check_loaded_weights`) instead of leaving random or empty weights."""
    root = resolve_model_path(source)
    index_file = root / "model_index.json"
    if not index_file.exists() and not index_file.is_symlink():
        raise ModelLoadError(f"{root} is not a diffusers model directory: model_index.json is missing")
    index = read_model_index(index_file)
    family = family_for_index(index)
    listed = _check_part_folders(root, index, family)

    def load(part: str, base: type, **kwargs):
        """The model's ``part``, of the class ``model_index.json`` names for it (see :func:`_load_part`)."""
        return _load_part(part, root / part, index[part], index_file, base, kwargs)

    weights = dict(use_safetensors=True, local_files_only=True, torch_dtype=dtype)
    # Without accelerate, diffusers warns on every load that it falls back to this; say it ourselves.
    diffusers_weights = weights if importlib.util.find_spec("accelerate") else {**weights, "low_cpu_mem_usage": False}
    components = Components(
        **family.load(load, weights, diffusers_weights, listed),
        source=source_name(source, root),
        family=family,
        declarations=read_declarations(root),
        pipeline_options={k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
    )
    return components.eval().to(device)


def _check_part_folders(root: Path, index: dict, family: ModelFamily) -> frozenset[str]:
    """The optional parts ``index`` lists, once every part the family requires and every listed one (the VAE too)
    has its folder, the weights are safetensors and every part's configs read well, before any weights are read."""
    required = family.required_parts
    missing = [part for part in required if not (root / part).is_dir() or index.get(part, [None])[0] is None]
    if missing:
        raise ModelLoadError(f"{root} lacks the part(s) {', '.join(missing)}; expected folders {', '.join(required)}")
    has_vae = index.get("vae", [None])[0] is not None
    listed = frozenset(part for part in family.optional_parts if (index.get(part) or [None])[0] is not None)
    for part in sorted(listed) + (["vae"] if has_vae else []):
        if not (root / part).is_dir():
            raise ModelLoadError(f"{root}: model_index.json lists a {part} but the {part}/ folder is missing")
    optional_weights = tuple(part for part in sorted(listed) if part.startswith(("text_encoder", "transformer")))
    for part in family.weight_parts + optional_weights + (("vae",) if has_vae else ()):
        _check_safetensors(root / part, part)
    for part in required + tuple(sorted(listed)) + (("vae",) if has_vae else ()):
        check_part_configs(root / part)  # before any weights are read: a bad number is found at once
    return listed


def _load_part(part: str, folder: Path, entry: object, index_file: Path, base: type, kwargs: dict[str, Any]) -> Any:
    """One part from ``folder``, of the class its index ``entry`` ([library, class name]) names, a subclass of
    ``base``; a model's weights checked against its keys (:func:`check_loaded_weights`)."""
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
        raise ModelLoadError(f'{index_file}: "{part}" must be [library, class name], got {_short(entry)}')
    cls = _class_from(*entry, base)
    has_weights = issubclass(cls, (diffusers.ModelMixin, transformers.PreTrainedModel))
    if has_weights:  # the libraries' own account of the keys (ignorable ones, e.g. CLIP's position_ids, left out)
        kwargs = {**kwargs, "output_loading_info": True}
        if issubclass(cls, transformers.PreTrainedModel):  # counted below rather than raised after a log report
            kwargs["ignore_mismatched_sizes"] = True
    loaded = _from_pretrained(cls, part, folder, kwargs)
    if not has_weights:
        return loaded
    model, info = loaded
    check_loaded_weights(part, folder, model, info)
    return model


def _from_pretrained(cls: type, part: str, folder: Path, kwargs: dict[str, Any]) -> Any:
    """``cls.from_pretrained(folder, **kwargs)``, a missing, truncated or corrupted file refused in one line."""
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, SafetensorError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        # Missing, truncated or corrupted files: the libraries' loaders fail in all these ways
        # (a tokenizer.json without its keys raises KeyError, a config of the wrong shape TypeError,
        # transformers' conversion of a foreign checkpoint RuntimeError).
        text = str(error).strip()
        first_line = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
        raise ModelLoadError(f"cannot load {part} from {folder} (damaged or foreign file?): {first_line}") from None


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile file's value can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_json_object(path: Path) -> dict:
    """The JSON object a model's configuration file holds, or a one-line :class:`ModelLoadError` saying
    what the file is instead (a folder, too large, not UTF-8, not JSON, nested too deeply, not an object)."""
    if not path.is_file():
        raise ModelLoadError(f"{path} must be a file holding a JSON object, but it is {_kind_of(path)}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelLoadError(
            f"{path} is {size / 2**20:.0f} MiB; a model's configuration files are JSON of at most "
            f"{MAX_CONFIG_BYTES // 2**20} MiB (real ones are under 100 kB)"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelLoadError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "a model's configuration files are UTF-8 JSON"
        ) from None

    def finite(number: str) -> float:  # NaN, Infinity or 1e400: Python's JSON reads them, no library checks them
        if not math.isfinite(float(number)):
            raise ModelLoadError(
                f"{path} holds the number {number}, which is not finite (a NaN scale blacks out every image); "
                "a model's configuration holds finite numbers"
            )
        return float(number)

    try:
        value = json.loads(text, parse_float=finite, parse_constant=finite)
    except ModelLoadError:
        raise
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    except ValueError as error:  # an integer of thousands of digits
        raise ModelLoadError(f"{path} is not valid JSON ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise ModelLoadError(f"{path} nests JSON too deeply; a configuration is a flat JSON object") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object ({{...}}), not a {type(value).__name__}")
    return value


def _kind_of(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    return "a folder" if path.is_dir() else "not a regular file"


def part_names() -> frozenset[str]:
    """Every part name a family reads from ``model_index.json`` (``unet``, ``text_encoder_2``, ``vae`` …)."""
    parts = {part for family in FAMILIES.values() for part in family.required_parts + family.optional_parts}
    return frozenset(parts | {"vae"})


def read_model_index(index_file: Path) -> dict:
    """``model_index.json``, checked: a JSON object whose parts are ``[library, class name]`` pairs (or
    ``[null, null]``: no such part) and whose ``_class_name`` is a class name."""
    index = read_json_object(index_file)
    if not _is_name(index.get("_class_name", "NegpromptPipeline")):
        raise ModelLoadError(
            f'{index_file}: "_class_name" must be a pipeline class name such as "StableDiffusionPipeline", '
            f"got {_short(index['_class_name'])}"
        )
    known = part_names()
    for key, entry in index.items():
        if key.startswith("_") or not (key in known or isinstance(entry, list)):
            continue  # a pipeline setting, e.g. force_zeros_for_empty_prompt
        if not (isinstance(entry, list) and len(entry) == 2 and all(x is None or _is_name(x) for x in entry)):
            raise ModelLoadError(
                f"{index_file}: {json.dumps(key)} must be [library, class name] such as "
                f'["diffusers", "UNet2DConditionModel"] (or [null, null] for none), got {_short(entry)}'
            )
    return index


def check_part_configs(folder: Path) -> None:
    """A part's configuration files (``config.json``, ``scheduler_config.json``), where it has them: JSON
    objects of finite numbers (:func:`read_json_object`), a scheduler's within bounds (:func:`check_scheduler_config`)."""
    for name in CONFIG_FILES:
        path = folder / name
        if path.exists() or path.is_symlink():
            config = read_json_object(path)
            if name == "scheduler_config.json":
                check_scheduler_config(config, path)


def _is_name(value: object) -> bool:
    """Whether ``value`` is a Python name, or dotted names (a library or class in ``model_index.json``)."""
    return isinstance(value, str) and all(part.isidentifier() for part in value.split("."))


def check_scheduler_config(config: dict, path: Path) -> None:
    """Refuses a scheduler configuration whose sizes or numbers would hang or poison the schedule: at most
    ``MAX_TRAIN_TIMESTEPS`` training timesteps (``negprompt.limits``), finite numbers, betas in [0, 1)."""
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise ModelLoadError(
            f"{path}: num_train_timesteps is {_short(steps)}; it must be a whole number in 1–{MAX_TRAIN_TIMESTEPS} "
            "(the scheduler builds arrays this long; released models use 1000)"
        )
    betas = config.get("trained_betas")
    numbers = {k: v for k, v in config.items() if isinstance(v, float | int) and not isinstance(v, bool)}
    if isinstance(betas, list):
        if len(betas) > MAX_TRAIN_TIMESTEPS:
            raise ModelLoadError(
                f"{path}: trained_betas holds {len(betas)} values; at most {MAX_TRAIN_TIMESTEPS}, one per training timestep"
            )
        numbers.update({f"trained_betas[{i}]": v for i, v in enumerate(betas)})
    for key, value in numbers.items():
        if not _finite_number(value) or (key.startswith(("beta_", "trained_betas")) and not 0 <= value < 1):
            raise ModelLoadError(
                f"{path}: {key} is {_short(value)}; scheduler settings are finite numbers"
                + (", betas in [0, 1)" if key.startswith(("beta_", "trained_betas")) else "")
            )


def _finite_number(value: object) -> bool:
    """Whether ``value`` is a real number a float holds (not a bool, nan, ±inf, or an integer past 2⁶³)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= 2**63


def check_loaded_weights(part: str, folder: Path, model: torch.nn.Module, info: dict) -> None:
    """Refuses a part whose weight file did not fill it: ``info`` is the library's loading account
    (``output_loading_info``: missing, unexpected and mismatched keys, after the keys the model class
    declares ignorable are left out). Without this a foreign file loads as random (transformers) or empty
    (diffusers, on the meta device) weights."""
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    expected = len(model.state_dict())
    found = max(expected - len(missing) - len(mismatched), 0)
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected"
    if mismatched:
        counts += f", {len(mismatched)} of another shape"
    examples = [
        f"first missing {min(missing)!r}" if missing else "",
        f"first unexpected {min(unexpected)!r}" if unexpected else "",
    ]
    if mismatched:
        key, in_file, in_model = sorted(mismatched)[0][:3]
        examples.append(f"{key!r} is {tuple(in_file)} in the file, {tuple(in_model)} in the model")
    raise ModelLoadError(
        f"{part}: {found} of {expected} expected weights found in {folder}, {counts} "
        f"({'; '.join(e for e in examples if e)}); the file holds another model's weights or names: "
        f"give the part's own diffusers safetensors"
    )


def source_name(source: str | Path | None, root: Path) -> str:
    """How a run records its model: "shapes" (or "shapes-distilled"), a model id, or a local folder as an
    absolute path (so that a PNG's settings load from any working directory)."""
    if source is None or str(source) in BUNDLED_MODELS:
        return str(source or BUNDLED_NAME)
    if Path(source).expanduser().exists():
        return str(root.resolve())
    return str(source)


def read_declarations(root: Path) -> Declarations:
    """The model's ``negprompt.json`` (what it declares of itself), parsed and checked; empty when it has none."""
    path = root / DECLARATIONS_FILE
    if not path.exists() and not path.is_symlink():
        return Declarations()
    data = read_json_object(path)
    try:
        return Declarations.from_json(data)
    except DeclarationsError as error:
        raise ModelLoadError(f"{path}: {error}") from None
