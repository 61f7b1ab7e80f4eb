"""Running a capture and what it returns: maps as tensors with a JSON index, saved as safetensors.

Summaries of a capture (centroid, spread, …) are computed in the analysis layer:
``negprompt.analysis.attention_stats.summarize``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from negprompt.api import Generation
from negprompt.attention.capture import (
    CaptureError,
    CapturePlan,
    CaptureRequest,
    Reducer,
    capture_attention,
    plan_capture,
)
from negprompt.attention.tokens import TextKeys, tokenize_words
from negprompt.files import write_atomically
from negprompt.guidance import syntax
from negprompt.guidance.plan import UNCONDITIONAL
from negprompt.models.components import Components
from negprompt.runspec import RunSpec
from negprompt.sampling.loop import StepCallback
from negprompt.sampling.schedule import denoiser_calls
from negprompt.session import Session, as_session

MAPS_FILE = "maps.safetensors"
INDEX_FILE = "maps.json"


@dataclass
class AttentionCapture:
    """Captured tensors (see :mod:`negprompt.attention.capture` for their shapes) and their index."""

    tensors: dict[str, torch.Tensor]
    index: dict
    generation: Generation | None = None

    # ------------------------------------------------------------ access

    def word_index(self, branch: str, word: str) -> int:
        words = self.index["words"].get(branch)
        if words is None:
            raise CaptureError(f"branch {branch!r} was not captured; captured: {', '.join(self.index['words'])}")
        if word not in words:
            raise CaptureError(f"word {word!r} was not captured on branch {branch!r}; captured: {', '.join(words)}")
        return words.index(word)

    @property
    def frames(self) -> int | None:
        """A video's latent frames F′ (its statistics have a frame axis after B); None: images."""
        return self.index.get("frames")

    def maps(self, branch: str, word: str, layer: int | None = None) -> torch.Tensor:
        """(steps, B, S, S) float32 — a video's (steps, B, F′, S, S) —: the word's map per kept step (mean over
        layers unless ``layer``)."""
        w = self.word_index(branch, word)
        stored = self.tensors[f"maps.{branch}"][..., w, :, :].float()  # (steps, layers or 1, B[, F′], S, S)
        if layer is None:
            return stored.mean(dim=1)
        if self.index["average_layers"]:
            raise CaptureError("maps were averaged over layers during capture; capture with average_layers=False")
        return stored[:, layer]

    def frobenius(self, branch: str, word: str) -> torch.Tensor:
        """(steps, layers, B): ‖F_k‖_F per kept step and layer k (a video's: (steps, layers, B, F′), per frame)."""
        return self.tensors[f"frobenius.{branch}"][..., self.word_index(branch, word)]

    def mass(self, branch: str, word: str) -> torch.Tensor:
        """(steps, layers, B): attention mass of the word per layer (a video's: (steps, layers, B, F′))."""
        return self.tensors[f"mass.{branch}"][..., self.word_index(branch, word)]

    def energy(self, branch: str) -> torch.Tensor:
        """(steps, layers, B): Σ_heads mean_{tokens,pixels} A² (Ban et al.'s released code); a video's
        (steps, layers, B, F′), each latent frame's pixels apart."""
        return self.tensors[f"energy.{branch}"]

    def present(self, branch: str) -> torch.Tensor:
        """(steps,) bool: whether the branch was evaluated at each kept step."""
        return self.tensors[f"present.{branch}"]

    # ------------------------------------------------------------ files

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        maps_path, index_path = folder / MAPS_FILE, folder / INDEX_FILE

        def write_one(final: Path, temporary: Path) -> None:
            if final == maps_path:
                save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(temporary))
            else:
                temporary.write_text(json.dumps(self.index, indent=2) + "\n")

        write_atomically([maps_path, index_path], write_one)  # both files or neither
        return maps_path, index_path

    @classmethod
    def load(cls, folder: str | Path) -> AttentionCapture:
        folder = Path(folder)
        return cls(tensors=load_file(str(folder / MAPS_FILE)), index=json.loads((folder / INDEX_FILE).read_text()))


def branch_prompts(settings: RunSpec) -> dict[str, list[str]]:
    """Every branch a run can evaluate, with its prompt per image."""
    batch = len(settings.seeds)
    prompts = {name: term.prompts_for(batch) for name, term in settings.guidance.terms.items()}
    prompts[UNCONDITIONAL] = [""] * batch
    return prompts


def check_second_prompts(settings: RunSpec, request: CaptureRequest, components: Components) -> None:
    """With two CLIP encoders (SDXL, SD3) a key position holds both encoders' tokens at that position: the
    captured branches' second prompts must put the same words at the same positions as their first
    (FLUX: the same text, since its keys are T5's tokens of the second prompt)."""
    batch = len(settings.seeds)
    terms = settings.guidance.terms
    for branch in request.words:
        term = terms.get(branch)
        if term is None or term.prompt_2 is None:
            continue
        for first, second in zip(term.prompts_for(batch), term.second_texts_at(0, settings.steps, batch)):
            if components.attention_layout.keys_from_second_prompt:  # FLUX: T5's tokens of prompt_2 are the keys
                if second is not None and syntax.plain_text(second) != syntax.plain_text(first):
                    raise CaptureError(
                        f"the {branch} branch's prompt_2 {second!r} differs from its prompt {first!r}; FLUX's attention "
                        "keys are T5's tokens of prompt_2, so capture it with the same text for both"
                    )
                continue
            one = tokenize_words(components.tokenizer, syntax.plain_text(first))
            two = tokenize_words(components.tokenizer_2, syntax.plain_text(second or first))
            if (one.words, one.positions) != (two.words, two.positions):
                raise CaptureError(
                    f"the {branch} branch's prompt_2 {second!r} puts other words at the key positions than its prompt "
                    f"{first!r}; attention maps words to positions, so capture it with the same text for both encoders"
                )


def plan_for(settings: RunSpec, request: CaptureRequest, model: Session | Components) -> CapturePlan:
    """The capture plan of a run (raises before sampling if the request cannot be met)."""
    components = model.components if isinstance(model, Session) else model
    calls = denoiser_calls(settings.scheduler, components.scheduler, settings.steps)
    factor = components.latent_factor
    latent_hw = (settings.height // factor, settings.width // factor)
    # a video's latents (C, F′, h, w): the family says how many latent frames its frames make
    shape = components.family.latent_shape(components, settings.height, settings.width, settings.frames)
    latent_frames = shape[1] if len(shape) == 4 else 1
    if components.tokenizer_2 is not None:
        check_second_prompts(settings, request, components)
    plain = {branch: [syntax.plain_text(p) for p in prompts] for branch, prompts in branch_prompts(settings).items()}
    return plan_capture(
        components.denoiser,
        components.tokenizer,
        plain,
        request,
        calls,
        latent_hw,
        components.attention_layout,
        TextKeys.from_segments(components.family.text_key_segments(components)),
        latent_frames,
    )


def capture(
    settings: RunSpec,
    request: CaptureRequest,
    session: Session | Components | None = None,
    trace: bool = True,
    progress: bool = False,
    *,
    reducer: Reducer,
    callback: StepCallback | None = None,
) -> AttentionCapture:
    """Generates ``settings`` while capturing the cross-attention maps ``request`` asks for.

    ``session``: the session to run on (Components are wrapped in one; None loads ``settings.model``).
    ``reducer``: what each layer's probabilities are reduced to and stored (the toolkit's own:
    ``negprompt.analysis.attention_stats.reduce_layer``; this layer does not import analysis).
    The session's lock is held while the attention processors are swapped. ``callback`` sees each
    step as in :meth:`Session.run`.
    """
    session = as_session(settings.model if session is None else session, device=settings.device, dtype=settings.dtype)
    with session.exclusive() as components:
        plan = plan_for(settings, request, components)
        first, *experts = components.family.denoisers(components)  # Wan 2.2: its low-noise expert too
        with capture_attention(first, plan, reducer, experts=experts) as recorder:
            generation = session.run(settings, trace=trace, callback=callback, unet_hooks=[recorder], progress=progress)
    index = {
        "settings": settings.to_json(),
        "branches": plan.branches,
        "words": plan.words,
        "prompts": {b: [t.prompt for t in plan.prompts[b]] for b in plan.branches},
        "tokens": {
            b: [{w: list(t.positions_of(w)) for w in plan.words[b]} for t in plan.prompts[b]] for b in plan.branches
        },
        "layers": [{"path": layer.path, "side": plan.latent_hw[0] // layer.factor} for layer in plan.layers],
        "average_layers": plan.average_layers,
        "steps": plan.steps,
        "timesteps": [recorder.timesteps.get(s) for s in plan.steps],
        "num_steps": plan.num_steps,
        "size": plan.size,
        "memory_estimate_bytes": plan.memory_bytes(),
        "memory_stored_bytes": recorder.stored_bytes(),
    }
    if plan.frames is not None:  # a video: statistics per latent frame
        index["frames"] = plan.frames
    return AttentionCapture(tensors=recorder.tensors, index=index, generation=generation)
