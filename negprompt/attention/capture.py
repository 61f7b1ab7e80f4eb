"""Cross-attention capture through diffusers attention processors.

:func:`capture_attention` installs a capture processor on every selected layer with text keys (keyed
by the module path diffusers gives it, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``,
through :func:`negprompt.layers.processors.installed`) and restores the original processors on exit,
also after an error. Which layers, and what their maps are, the family's attention layout says: a
UNet's cross-attention layers (:class:`CaptureProcessor`), or an MMDiT's joint attention layers
(SD3, FLUX), whose maps are the image-query × text-key block of the softmax over [text; image] keys
(:class:`JointCaptureProcessor`). Each capture processor lets the original processor compute the
layer's output — so images are bit-identical with and without capture — and computes the attention
probabilities beside it (:mod:`negprompt.layers.attention`): softmax(q·kᵀ/√d) over the text tokens,
per head, shaped (B·heads, Q, L). A processor that replaces a layer's attention for a rule (NAG, VSF)
hands the capture the attention on the negative it reads, through
:class:`~negprompt.layers.processors.AttentionObserver`.

The sampling loop tells the recorder which step it is and which branch each batch block holds
(:meth:`AttentionRecorder.before_unet_call`); nothing counts calls or keeps global state.

The instrument records; it computes no statistics. For each layer and branch the recorder slices
that branch's rows, (B, heads, Q, L) float32, and hands them to a :class:`Reducer`, which returns
tensors by name; the recorder stores them into preallocated tensors (all on CPU). The statistics of
the toolkit's reducer, ``negprompt.analysis.attention_stats.reduce_layer``, fill, per branch:

- ``maps``: (steps, layers or 1, B, words, S, S) float16 — head-averaged maps of each chosen word
  (the sum over the word's tokens), upsampled bicubically to S×S and clamped ≥ 0 by the reducer;
  stored per layer or, by the recorder, averaged over the chosen layers (summed in float32);
- ``frobenius``: (steps, layers, B, words) float32 — ‖map‖_F of the upsampled map in each layer,
  the F of the article's eq. (10);
- ``mass``: (steps, layers, B, words) float32 — Σ of the native-resolution map (attention mass);
- ``energy``: (steps, layers, B) float32 — Σ_heads mean over all L token maps and pixels of A², the
  quantity of Ban et al.'s released r_t code.

The recorder itself keeps ``present``: (steps,) bool — whether the branch was evaluated at that step
(a delayed negative is not). Statistics a reducer does not return stay NaN (maps stay 0).

A video's layers (the layout's ``frames``: image tokens over (F′, h′, w′)) are reduced frame by frame — the reducer
sees one latent frame's h′·w′ queries at a time — and every per-image tensor above gains a frame axis after B:
``maps`` (steps, layers or 1, B, F′, words, S, S), ``frobenius``/``mass`` (steps, layers, B, F′, words), ``energy``
(steps, layers, B, F′). An image's tensors are as above (``CapturePlan.frames`` None).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from negprompt.attention.tokens import TextKeys, TokenizedPrompt
from negprompt.errors import NegpromptError
from negprompt.layers.attention import (
    attention_paths,
    cross_attention_probabilities,
    is_cross_attention,
    joint_attention_probabilities,
)
from negprompt.layers.layout import AttentionLayout
from negprompt.layers.processors import installed
from negprompt.sampling.loop import RowBlock

MAP_DTYPE = torch.float16
STAT_DTYPE = torch.float32
REDUCED = ("maps", "frobenius", "mass", "energy")  # what a reducer may return, by name


class CaptureError(NegpromptError):
    """A capture request that cannot be met (unknown layer, step, word; over the memory limit)."""


# ---------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerInfo:
    path: str  # module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    factor: int  # the layer's maps are (latent side / factor)²


def cross_attention_layers(unet: Any) -> list[LayerInfo]:
    """Every cross-attention layer of a UNet2DConditionModel with its downsampling factor."""
    levels = len(unet.config.block_out_channels)
    layers = []
    for path, module in unet.named_modules():
        if not is_cross_attention(module):
            continue
        match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", path)
        if match:
            index = int(match.group(2))
            factor = 2**index if match.group(1) == "down_blocks" else 2 ** (levels - 1 - index)
        elif path.startswith("mid_block."):
            factor = 2 ** (levels - 1)
        else:
            continue
        layers.append(LayerInfo(path, factor))
    return layers


def attention_layers(denoiser: Any, layout: AttentionLayout) -> list[LayerInfo]:
    """The layers whose attention maps text to pixels: a UNet's cross-attention layers, or every joint
    attention layer of an MMDiT transformer (maps (latent side / ``patch``)², ``patch`` latent cells per token)."""
    if layout.reader is not None:
        return [LayerInfo(path, layout.patch) for path in layout.reader.paths(denoiser)]
    if layout.kind == "cross":
        return cross_attention_layers(denoiser)
    return [LayerInfo(path, layout.patch) for path in attention_paths(denoiser, layout.kind)]


def select_layers(available: Sequence[LayerInfo], wanted: Sequence[str] | None, latent_side: int) -> list[LayerInfo]:
    """Layers by exact path, by path prefix (``up_blocks.1``), or by map side (``16`` = 16×16 maps)."""
    if not wanted:
        return list(available)
    chosen: list[LayerInfo] = []
    for item in wanted:
        item = item.strip()
        if item.isdigit():
            matches = [layer for layer in available if latent_side // layer.factor == int(item)]
        else:
            matches = [
                layer for layer in available if layer.path == item or layer.path.startswith(item.rstrip(".") + ".")
            ]
        if not matches:
            sides = sorted({latent_side // layer.factor for layer in available})
            raise CaptureError(
                f"no cross-attention layer matches {item!r}; give a map side ({', '.join(map(str, sides))}) "
                f"or a path such as {available[0].path!r} (all: {', '.join(layer.path for layer in available)})"
            )
        chosen.extend(layer for layer in matches if layer not in chosen)
    return chosen


# ---------------------------------------------------------------- request


@dataclass(frozen=True)
class CaptureRequest:
    """What to keep. ``words``: per branch, the words whose maps to keep (may be empty: statistics only)."""

    words: Mapping[str, Sequence[str]]
    layers: Sequence[str] | None = None  # None: every cross-attention layer
    steps: Sequence[int] | None = None  # None: every step
    average_layers: bool = True  # keep one map per word and step (mean over layers) instead of one per layer
    size: int | None = None  # side of the stored maps; None: the largest layer's side
    memory_limit_mb: float = 1024.0


@dataclass
class CapturePlan:
    """A request resolved against a model and a run: what exactly will be stored, and its size."""

    branches: list[str]
    words: dict[str, list[str]]
    prompts: dict[str, list[TokenizedPrompt]]  # per branch, per image
    layers: list[LayerInfo]
    steps: list[int]
    num_steps: int
    batch_size: int
    size: int
    latent_hw: tuple[int, int]
    average_layers: bool
    layout: AttentionLayout  # the family's: which layers, which processors record
    selection: dict[str, torch.Tensor] = field(default_factory=dict)  # branch → (B, words, L) 0/1
    text_length: int = 77  # L: text keys per layer
    frames: int | None = None  # a video's latent frames F′ (statistics per frame); None: an image

    @property
    def per_image(self) -> tuple[int, ...]:
        """The axes of one row's statistics: (B,), or (B, F′) for a video."""
        return (self.batch_size,) if self.frames is None else (self.batch_size, self.frames)

    @property
    def stored_layers(self) -> int:
        return 1 if self.average_layers else len(self.layers)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        shapes = {}
        for branch in self.branches:
            n_words = len(self.words[branch])
            steps, layers, rows = len(self.steps), len(self.layers), self.per_image
            shapes[f"maps.{branch}"] = ((steps, self.stored_layers, *rows, n_words, self.size, self.size), MAP_DTYPE)
            shapes[f"frobenius.{branch}"] = ((steps, layers, *rows, n_words), STAT_DTYPE)
            shapes[f"mass.{branch}"] = ((steps, layers, *rows, n_words), STAT_DTYPE)
            shapes[f"energy.{branch}"] = ((steps, layers, *rows), STAT_DTYPE)
            shapes[f"present.{branch}"] = ((steps,), torch.bool)
        return shapes

    def memory_bytes(self) -> int:
        """Bytes the stored tensors take, computed before anything is allocated."""
        return sum(
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for shape, dtype in self.tensor_shapes().values()
        )


def plan_capture(
    denoiser: Any,
    tokenizer: Any,
    branch_prompts: Mapping[str, Sequence[str]],
    request: CaptureRequest,
    num_steps: int,
    latent_hw: tuple[int, int],
    layout: AttentionLayout,
    text_keys: TextKeys | None = None,
    latent_frames: int = 1,
) -> CapturePlan:
    """Resolves and checks a request; raises :class:`CaptureError` before any sampling.

    ``branch_prompts``: per branch, each image's prompt as plain text (no prompt-editing syntax);
    ``text_keys``: how the text keys are laid out (default: ``tokenizer``'s tokens, padded to its
    length); ``layout``: the family's attention layout (which layers; a transformer's patch; a video's
    frame axis, over ``latent_frames`` latent frames)."""
    check_request(request, branch_prompts, layout)
    text_keys = text_keys or TextKeys.of(tokenizer)
    latent_side = min(latent_hw)
    layers = select_layers(attention_layers(denoiser, layout), request.layers, latent_side)
    steps = planned_steps(request.steps, num_steps)
    size = request.size or max(latent_side // layer.factor for layer in layers)
    if size < 1:
        raise CaptureError(f"map size must be a positive number of pixels, got {size}")
    if layout.frames and latent_frames < 1:
        raise CaptureError(f"a video of {latent_frames} latent frames has nothing to capture; give at least one frame")
    prompts = {b: [text_keys.tokenize(p) for p in branch_prompts[b]] for b in request.words}
    words = {b: list(request.words[b]) for b in request.words}
    plan = CapturePlan(
        branches=list(request.words),
        words=words,
        prompts=prompts,
        layers=layers,
        steps=steps,
        num_steps=num_steps,
        batch_size=len(next(iter(branch_prompts.values()))),
        size=size,
        latent_hw=latent_hw,
        average_layers=request.average_layers,
        layout=layout,
        text_length=text_keys.length,
        frames=latent_frames if layout.frames else None,
    )
    plan.selection = {b: word_selection(prompts[b], words[b], text_keys.length) for b in plan.branches}
    check_memory(plan, request.memory_limit_mb)
    return plan


def check_request(
    request: CaptureRequest, branch_prompts: Mapping[str, Sequence[str]], layout: AttentionLayout
) -> None:
    """Raises :class:`CaptureError` for a model whose attention is not read, or a branch the run lacks."""
    if layout.kind == "unread":
        raise CaptureError(f"negprompt cannot yet capture the attention of {layout.family or 'this model'}")
    unknown = [b for b in request.words if b not in branch_prompts]
    if unknown:
        raise CaptureError(f"branch(es) {', '.join(unknown)} not in this run; branches: {', '.join(branch_prompts)}")


def planned_steps(wanted: Sequence[int] | None, num_steps: int) -> list[int]:
    """The steps to record, sorted, each once (None: every step); :class:`CaptureError` for none or one outside
    0…``num_steps`` − 1."""
    steps = list(range(num_steps)) if wanted is None else sorted(set(int(s) for s in wanted))
    bad_steps = [s for s in steps if not 0 <= s < num_steps]
    if bad_steps:
        raise CaptureError(f"step(s) {bad_steps} outside the schedule; steps are 0–{num_steps - 1}")
    if not steps:
        raise CaptureError(f"no steps chosen; give step indices in 0–{num_steps - 1}")
    return steps


def check_memory(plan: CapturePlan, limit_mb: float) -> None:
    """Raises :class:`CaptureError` when the plan's stored tensors would take more than ``limit_mb`` MiB."""
    needed = plan.memory_bytes()
    if needed > int(limit_mb * 2**20):
        raise CaptureError(
            f"the capture needs {needed / 2**20:.1f} MiB, over the limit of {limit_mb:g} MiB; "
            "raise the limit or keep fewer steps, layers, words or a smaller map size"
        )


def word_selection(prompts: Sequence[TokenizedPrompt], words: Sequence[str], length: int) -> torch.Tensor:
    """(B, words, L) 0/1: the text-key positions of each word in each image's prompt."""
    selection = torch.zeros(len(prompts), len(words), length)
    for i, tokenized in enumerate(prompts):
        for w, word in enumerate(words):
            selection[i, w, list(tokenized.positions_of(word))] = 1.0
    return selection


# ---------------------------------------------------------------- recording


class Reducer(Protocol):
    """What the recorder reduces one branch's probabilities in one layer to.

    ``probabilities``: (B, heads, Q, L) float32, softmax over the L tokens, Q = h·w pixels;
    ``selection``: (B, words, L) 0/1, the tokens of each chosen word (``CapturePlan.selection``),
    on the probabilities' device; ``hw``: the layer's map side (h, w); ``size``: side S of the stored
    maps. Returns tensors by name, any of :data:`REDUCED`: ``energy`` (B,), ``mass`` and ``frobenius``
    (B, words), ``maps`` (B, words, S, S) float32; names left out are not stored.
    """

    def __call__(
        self, probabilities: torch.Tensor, selection: torch.Tensor, hw: tuple[int, int], size: int
    ) -> Mapping[str, torch.Tensor]: ...


class AttentionRecorder:
    """Holds the captured tensors; told each step's layout by the sampling loop, fed by the reducer."""

    def __init__(self, plan: CapturePlan, reducer: Reducer, group: int = 0) -> None:
        self.plan = plan
        self.reducer = reducer
        self.group = group  # which group of the run to record (see negprompt.sampling.loop.Group)
        self.tensors = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in plan.tensor_shapes().items()}
        for name in self.tensors:
            if name.startswith(("frobenius.", "mass.", "energy.")):
                self.tensors[name].fill_(float("nan"))
        self._step_slot: dict[int, int] = {step: i for i, step in enumerate(plan.steps)}
        self._layer_slot = {layer.path: i for i, layer in enumerate(plan.layers)}
        self._layout: dict[str, int] = {}  # branch → first row in the UNet batch, for the current call
        self._in_call = False  # whether the current call evaluates the recorded group
        self._slot: int | None = None  # index into plan.steps for the current call
        self._sums: dict[str, torch.Tensor] = {}  # averaged maps being summed over layers, float32, on the device
        self._pending: list[tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = []  # (stored tensor, index, value)
        self._layers_seen: set[str] = set()
        self.timesteps: dict[int, float] = {}

    # The loop calls this before every UNet call (the UNetCallHook protocol).
    def before_unet_call(self, step: int, timestep: float, blocks: Sequence[RowBlock]) -> None:
        self._flush()
        self._slot = self._step_slot.get(step)
        self._layout = {}
        self._in_call = any(block.group == self.group for block in blocks)
        for block in blocks:
            if block.group == self.group and block.branch in self.plan.branches:
                if block.stop - block.start != self.plan.batch_size:
                    raise CaptureError(
                        f"capture planned for {self.plan.batch_size} images, the run has {block.stop - block.start}"
                    )
                self._layout[block.branch] = block.start
        self.timesteps[step] = timestep
        if self._slot is not None:
            for branch in self._layout:
                self.tensors[f"present.{branch}"][self._slot] = True

    def finish(self) -> None:
        self._flush()
        self._slot = None

    def _flush(self) -> None:
        """Stores the step that just ended: its layer-averaged maps and every statistic staged on the device."""
        if self._slot is not None and self.plan.average_layers and self._sums:
            count = max(1, len(self._layers_seen))
            for branch, summed in self._sums.items():
                self._pending.append((self.tensors[f"maps.{branch}"], (self._slot, 0), (summed / count).to(MAP_DTYPE)))
        self._copy_pending()
        self._sums = {}
        self._layers_seen = set()

    def _copy_pending(self) -> None:
        """The staged values to their stored tensors on the host: one copy per dtype and step (values flattened
        into one tensor on their device), not one per statistic, layer and branch — each copy from a GPU waits
        for it. The values are copied exactly."""
        by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, tuple[int, int], torch.Tensor]]] = {}
        for item in self._pending:
            by_dtype.setdefault(item[2].dtype, []).append(item)
        self._pending = []
        for items in by_dtype.values():
            host = torch.cat([value.reshape(-1) for _, _, value in items]).cpu()
            for (target, index, value), part in zip(items, host.split([value.numel() for _, _, value in items])):
                target[index] = part.view(value.shape)

    @property
    def active(self) -> bool:
        return self._slot is not None and bool(self._layout)

    @property
    def text_length(self) -> int:
        """L: the text keys the recorded probabilities hold (a single-stream layer's text tokens lead its own)."""
        return self.plan.text_length

    def record(self, path: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes one layer's probabilities (B_total·heads, Q, L) for the current step."""
        plan, slot = self.plan, self._slot
        assert slot is not None
        layer = self._layer_slot[path]
        factor = plan.layers[layer].factor
        h, w = plan.latent_hw[0] // factor, plan.latent_hw[1] // factor
        total, queries, length = probabilities.shape
        if queries != (plan.frames or 1) * h * w:
            frames = "" if plan.frames is None else f"{plan.frames}×"
            raise CaptureError(f"layer {path}: {queries} queries, expected {frames}{h}×{w}")
        probs = probabilities.detach().float().reshape(total // heads, heads, queries, length)
        batch = plan.batch_size
        self._layers_seen.add(path)
        for branch, first_row in self._layout.items():
            part = probs[first_row : first_row + batch]  # (B, heads, Q, L)
            reduced = self._reduce(part, plan.selection[branch].to(part.device), (h, w))
            self._store(path, branch, slot, layer, reduced)

    def _reduce(
        self, probabilities: torch.Tensor, selection: torch.Tensor, hw: tuple[int, int]
    ) -> Mapping[str, torch.Tensor]:
        """The reducer's tensors of one branch's probabilities (B, heads, Q, L): of the image, or, for a video
        (Q = F′·h′·w′, frame by frame), each frame's, stacked on a frame axis after B."""
        if self.plan.frames is None:
            return self.reducer(probabilities, selection, hw, self.plan.size)
        per_frame = [
            self.reducer(frame, selection, hw, self.plan.size)
            for frame in probabilities.split(hw[0] * hw[1], dim=2)  # (B, heads, h′·w′, L) each
        ]
        return {name: torch.stack([reduced[name] for reduced in per_frame], dim=1) for name in per_frame[0]}

    def wants_context(self, branch: str) -> bool:
        """Whether a context recorded as ``branch`` (no row of the call) is wanted at the current call:
        a recorded step, a call of the recorded group, a branch of the plan."""
        return self._slot is not None and self._in_call and branch in self.plan.branches

    def record_context(self, path: str, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        """Takes one layer's probabilities (B·heads, Q, L) of a context that is no row of the call: a
        negative read inside the positive's pass (NAG, VSF), recorded as the branch ``branch``."""
        if not self.wants_context(branch):
            return
        plan = self.plan
        layer = self._layer_slot[path]
        factor = plan.layers[layer].factor
        h, w = plan.latent_hw[0] // factor, plan.latent_hw[1] // factor
        queries = (plan.frames or 1) * h * w
        probs = probabilities.detach().float().reshape(-1, heads, queries, probabilities.shape[-1])
        if probs.shape[0] != plan.batch_size:
            raise CaptureError(f"capture planned for {plan.batch_size} images, the context has {probs.shape[0]}")
        self.tensors[f"present.{branch}"][self._slot] = True
        self._layers_seen.add(path)
        reduced = self._reduce(probs, plan.selection[branch].to(probs.device), (h, w))
        self._store(path, branch, self._slot, layer, reduced)

    def _store(self, path: str, branch: str, slot: int, layer: int, reduced: Mapping[str, torch.Tensor]) -> None:
        """Copies what the reducer returned into the stored tensors (maps: kept for the layer mean)."""
        for name, value in reduced.items():
            if name not in REDUCED:
                raise CaptureError(f"layer {path}: the reducer returned {name!r}; it may return {', '.join(REDUCED)}")
            target = self.tensors[f"{name}.{branch}"]
            expected = tuple(target.shape[2:])
            if tuple(value.shape) != expected:
                raise CaptureError(
                    f"layer {path}: the reducer's {name!r} for {branch!r} is {tuple(value.shape)}, expected {expected}"
                )
            if value._base is not None:  # a view (e.g. of a buffer the layer reuses): kept as it is now
                value = value.clone()
            if name != "maps":
                self._pending.append((target, (slot, layer), value))
            elif self.plan.average_layers:  # summed on the device, in the order the layers ran
                self._sums[branch] = self._sums[branch] + value if branch in self._sums else value
            else:
                self._pending.append((target, (slot, layer), value.to(MAP_DTYPE)))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class CaptureProcessor:
    """Wraps a cross-attention layer's original processor: same output, plus the probabilities
    (B·heads, Q, L) for the recorder.

    An :class:`~negprompt.layers.processors.AttentionObserver`: a processor that replaces the layer's
    attention for a rule (NAG, VSF) calls this one on the whole batch and hands it the attention on
    the negative it reads (:meth:`observe_context`).
    """

    def __init__(self, original: Any, recorder: AttentionRecorder, path: str) -> None:
        self.original = original
        self.recorder = recorder
        self.path = path

    def wants_context(self, branch: str) -> bool:
        return self.recorder.wants_context(branch)

    def observe_context(self, branch: str, probabilities: torch.Tensor, heads: int) -> None:
        self.recorder.record_context(self.path, branch, probabilities, heads)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if self.recorder.active and encoder_hidden_states is not None:
            probabilities = cross_attention_probabilities(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
            self.recorder.record(self.path, probabilities, attn.heads)
        return output


class JointCaptureProcessor(CaptureProcessor):
    """Wraps a joint attention layer's original processor (SD3, FLUX): same output, plus the
    image-query × text-key probabilities (B·heads, N, L) for the recorder."""

    def __init__(self, original: Any, recorder: AttentionRecorder, path: str, text_length: int) -> None:
        super().__init__(original, recorder, path)
        self.text_length = text_length

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        if image_rotary_emb is None:  # SD3's processor takes no rotary embedding
            output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        else:
            output = self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs
            )
        if self.recorder.active:
            probabilities = joint_attention_probabilities(
                attn, hidden_states, encoder_hidden_states, self.text_length, image_rotary_emb
            )
            self.recorder.record(self.path, probabilities, attn.heads)
        return output


@contextmanager
def capture_attention(
    denoiser: Any, plan: CapturePlan, reducer: Reducer, group: int = 0, experts: Sequence[Any] = ()
) -> Iterator[AttentionRecorder]:
    """Installs capture processors on the planned layers; restores the originals on exit (also on error).
    ``experts``: further denoisers with the same layers that predict at some steps (Wan 2.2's low-noise
    ``transformer_2``), recorded alike.

    ``reducer`` computes what is stored of each layer's probabilities (the toolkit's own:
    ``negprompt.analysis.attention_stats.reduce_layer``).

    ``group`` picks which group of a batched run (see ``negprompt.sampling.loop.Group``) is recorded;
    captures of several groups nest.
    """
    recorder = AttentionRecorder(plan, reducer, group)
    wanted = {layer.path for layer in plan.layers}

    def make(path: str, original: Any) -> Any:
        if path not in wanted:
            return None
        if plan.layout.reader is not None:
            return plan.layout.reader.capture_processor(path, original, recorder)
        if plan.layout.kind == "joint":
            return JointCaptureProcessor(original, recorder, path, plan.text_length)
        return CaptureProcessor(original, recorder, path)

    # A reader may need a context of its own while its processors record (Z-Image's: a hook reading each call's rows).
    capturing = getattr(plan.layout.reader, "capturing", None)
    with ExitStack() as stack:
        for module in (denoiser, *experts):
            stack.enter_context(installed(module, make))
            stack.enter_context(nullcontext() if capturing is None else capturing(module))
        try:
            yield recorder
        finally:
            recorder.finish()
