"""Writes a model as a diffusers-style directory: ``model_index.json`` plus one folder per part.

Weights are written as safetensors only. The layout is the one Stable Diffusion checkpoints use,
so :func:`negprompt.models.loading.load_components` reads the bundled model and an SD checkpoint
with the same code.
"""

from __future__ import annotations

from pathlib import Path

import diffusers

from negprompt.files import write_json
from negprompt.models.components import Components

PIPELINE_CLASS = "NegpromptPipeline"


def _library_of(obj: object) -> str:
    return obj.__class__.__module__.split(".")[0]


def save_components(components: Components, folder: str | Path) -> Path:
    """Saves every part of ``components`` under ``folder`` and writes the model index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    class_name = components.family.saved_pipeline_class or PIPELINE_CLASS
    index: dict[str, object] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    index.update(components.pipeline_options)
    denoiser = "unet" if components.unet is not None else "transformer"
    names = (denoiser, "text_encoder", "vae") + tuple(
        name
        for name in ("transformer_2", "text_encoder_2", "text_encoder_3")
        if getattr(components, name, None) is not None
    )
    if "text_encoder_3" in components.family.optional_parts and components.text_encoder_3 is None:
        names += ("text_encoder_3",)  # listed as null: SD3 without T5
    for name in names:
        part = getattr(components, name)
        if part is None:
            index[name] = [None, None]
            continue
        part.save_pretrained(folder / name, safe_serialization=True)
        index[name] = [_library_of(part), part.__class__.__name__]
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(components, name)
        if tokenizer is None and name == "tokenizer_3" and "text_encoder_3" in names:
            index[name] = [None, None]
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / name))
            index[name] = [_library_of(tokenizer), tokenizer.__class__.__name__]
    components.scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", components.scheduler.__class__.__name__]
    write_json(folder / "model_index.json", index, indent=2)
    return folder
