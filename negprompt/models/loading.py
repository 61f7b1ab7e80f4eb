"""Loading a model offline: a diffusers directory, a model id in the local HF cache, or the bundled model.

Only safetensors weights are read. A folder that holds only pickled weights (``.bin``, ``.ckpt``,
``.pt``, ``.pth``) is refused: unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors import SafetensorError

from negprompt.errors import NegpromptError
from negprompt.models.components import Components
from negprompt.models.declarations import DECLARATIONS_FILE, Declarations, DeclarationsError
from negprompt.models.families import family_for_index

BUNDLED_NAME = "shapes"
BUNDLED_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes-model"
DISTILLED_NAME = "shapes-distilled"  # the bundled model guidance-distilled: scale as an input, one pass a step
BUNDLED_MODELS = {
    BUNDLED_NAME: BUNDLED_PATH,
    DISTILLED_NAME: BUNDLED_PATH.parent / "shapes-distilled",
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


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
    latent models, the VAE) in ``dtype`` on ``device``, without any network access."""
    root = resolve_model_path(source)
    index_file = root / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(f"{root} is not a diffusers model directory: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{index_file} is not valid JSON ({error.msg}, line {error.lineno})") from None
    family = family_for_index(index)
    required = family.required_parts
    missing = [part for part in required if not (root / part).is_dir() or index.get(part, [None])[0] is None]
    if missing:
        raise ModelLoadError(f"{root} lacks the part(s) {', '.join(missing)}; expected folders {', '.join(required)}")
    has_vae = index.get("vae", [None])[0] is not None
    listed = frozenset(part for part in family.optional_parts if (index.get(part) or [None])[0] is not None)
    for part in sorted(listed) + (["vae"] if has_vae else []):
        if not (root / part).is_dir():
            raise ModelLoadError(f"{root}: model_index.json lists a {part} but the {part}/ folder is missing")
    optional_weights = tuple(part for part in sorted(listed) if part.startswith("text_encoder"))
    for part in family.weight_parts + optional_weights + (("vae",) if has_vae else ()):
        _check_safetensors(root / part, part)

    def load(part: str, base: type, **kwargs):
        entry = index[part]
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise ModelLoadError(f'{index_file}: "{part}" must be [library, class name], got {entry!r}')
        cls = _class_from(*entry, base)
        try:
            return cls.from_pretrained(str(root / part), **kwargs)
        except (OSError, ValueError, SafetensorError, KeyError, TypeError, AttributeError) as error:
            # Missing, truncated or corrupted files: the libraries' loaders fail in all these ways
            # (a tokenizer.json without its keys raises KeyError, a config of the wrong shape TypeError).
            text = str(error).strip()
            first_line = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
            raise ModelLoadError(
                f"cannot load {part} from {root / part} (damaged or foreign file?): {first_line}"
            ) from None

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
    if not path.exists():
        return Declarations()
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f'{path} must hold a JSON object such as {{"steps": 20, "scale": 7.5}}')
    try:
        return Declarations.from_json(data)
    except DeclarationsError as error:
        raise ModelLoadError(f"{path}: {error}") from None
