"""A loaded model on a device, shared safely: build run specifications and run them.

>>> from negprompt import Session
>>> session = Session("shapes", device="auto", dtype="float32")
>>> spec = session.spec("a red circle", negative="a hat", seeds=[0, 1])
>>> session.run(spec).images[0].save("circle.png")

A :class:`Session` holds the model's parts with their device and dtype, and a lock that
serialises runs and attention-processor swaps, so a web server and a study can share one loaded
model. There is no module-level cache: keep the session to reuse the loaded model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from negprompt.devices import dtype_name, resolve_device, torch_dtype
from negprompt.errors import NegpromptError
from negprompt.guidance.plan import Guidance, MicroConditions, Term
from negprompt.guidance.rules.base import RuleSettings
from negprompt.guidance.windows import Window
from negprompt.limits import MAX_STEPS
from negprompt.models.components import Components
from negprompt.models.conditioning import Conditioning, PromptInput
from negprompt.models.embeddings import Embedding, EmbeddingError, add_embedding, check_embedding_source, file_digest
from negprompt.models.loading import load_components
from negprompt.runspec import Generation, RunSpec, SettingsError
from negprompt.sampling.loop import Group, StepCallback, UNetCallHook, encode_groups, prediction_type, sample_groups
from negprompt.sampling.schedule import denoiser_calls, noise_level, sigma_at, timesteps_of
from negprompt.sampling.schedulers import make_scheduler

FALLBACK_DEFAULTS = {"steps": 50, "scale": 7.5, "scheduler": "default"}


class Session:
    """A model loaded once on ``device`` in ``dtype``, with a lock serialising its use.

    ``model``: a diffusers directory, a model id in the local Hugging Face cache, None or "shapes"
    (the bundled model), or already built :class:`Components`. ``device``: auto | cpu | cuda | mps
    (auto: CUDA if available, then MPS, else CPU; for given Components, None keeps theirs).
    ``dtype``: float32 | float16 | bfloat16 (for given Components, None keeps theirs; other values
    move and cast the given Components in place). Device and dtype are checked before anything is
    loaded.
    """

    def __init__(
        self, model: str | Path | Components | None = None, *, device: str | None = None, dtype: str | None = None
    ) -> None:
        if isinstance(model, Components):
            components = model
            target_device = components.device.type if device is None else resolve_device(device)
            target_dtype = components.dtype if dtype is None else torch_dtype(dtype)
            dtype_name(target_dtype)
            if components.device.type != target_device or components.dtype != target_dtype:
                components.to(target_device, target_dtype)
        else:
            target_device, target_dtype = resolve_device(device), torch_dtype(dtype)
            components = load_components(model, device=target_device, dtype=target_dtype)
        self.components = components
        self.lock = threading.RLock()

    # ---------------------------------------------------------------- what it holds

    @property
    def model(self) -> str:
        """Where the parts came from: the name or path given, "shapes", or "in memory"."""
        return self.components.source

    @property
    def device(self) -> str:
        """cpu | cuda | mps."""
        return self.components.device.type

    @property
    def dtype(self) -> str:
        """float32 | float16 | bfloat16."""
        return dtype_name(self.components.dtype)

    @property
    def defaults(self) -> dict[str, Any]:
        """Default steps, scale and scheduler of the model (its ``negprompt.json``, else diffusers'),
        with whatever else the model declares there (see ``Components.declarations``)."""
        return {**FALLBACK_DEFAULTS, **self.components.family.default_sampling, **self.components.declarations}

    def __repr__(self) -> str:
        return f"Session({self.model!r}, {self.components.family.name}, device={self.device!r}, dtype={self.dtype!r})"

    @contextmanager
    def exclusive(self) -> Iterator[Components]:
        """Holds the session's lock (re-entrant) while the caller changes the model (e.g. attention processors)."""
        with self.lock:
            yield self.components

    # ---------------------------------------------------------------- schedule and prompts

    def denoiser_calls(self, scheduler: str | None = None, steps: int | None = None) -> int:
        """UNet calls a run with this scheduler and step count makes (model defaults for None)."""
        scheduler = scheduler or self.defaults["scheduler"]
        steps = self.defaults["steps"] if steps is None else steps
        return denoiser_calls(scheduler, self.components.scheduler, steps)

    def encode(self, texts: Sequence[str]) -> dict[str, Conditioning]:
        """Each distinct text encoded alone by the model family's adapter (as a positive prompt at the
        model's default size, for SDXL)."""
        with self.lock:
            components = self.components
            if not components.family.size_conditioned:
                return components.family.encode(components, texts)
            side = components.default_size
            inputs = {text: PromptInput(text, size_conditions=(side, side, 0, 0, side, side)) for text in texts}
            encoded = components.family.encode(components, inputs.values())
            return {text: encoded[item] for text, item in inputs.items()}

    def unused_negatives(self, spec: RunSpec) -> list[str]:
        """The negative prompts a run never evaluates, as a branch or inside attention: e.g. any negative
        under rule 'sd' at scale 1 (FLUX's default, where diffusers warns the same way), whose ε̂ is the
        positive's alone."""
        calls = denoiser_calls(spec.scheduler, self.components.scheduler, spec.steps)
        guidance = spec.guidance
        try:
            guidance.validate(calls)
        except NegpromptError:
            return []  # the run will refuse these settings with its own message
        used = {
            b for step in range(calls) for b in guidance.branches_at(step, calls) + guidance.contexts_at(step, calls)
        }
        return [
            str(term.prompt)
            for name, term in guidance.terms.items()
            if name.startswith("negative") and name not in used
        ]

    def check_schedule(self, scheduler: str, steps: int) -> None:
        """Raises :class:`SettingsError` unless ``steps`` is a whole number in 1–1000 and, where the model
        declares ``max_sigma``, the schedule's first noise level σ is at most that (see docs/training.md)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise SettingsError(f"steps must be a whole number in 1–{MAX_STEPS}, got {steps!r}")
        limit = self.defaults.get("max_sigma")
        if limit is None:
            return
        base = self.components.scheduler

        def first_sigma(count: int) -> float:
            return sigma_at(base.alphas_cumprod, timesteps_of(scheduler, base, count)[0])

        first = first_sigma(steps)
        if first > limit:
            fewer = next((n for n in range(steps - 1, 0, -1) if first_sigma(n) <= limit), 1)
            raise SettingsError(
                f"{steps} steps of {scheduler} start at noise level σ = {first:.0f}, above the {limit:g} this model "
                f"samples reliably from (its noise schedule's σ grows without bound near the end and the first "
                f"step multiplies guidance errors by σ); the nearest step count below that starts low enough is {fewer}"
            )

    # ---------------------------------------------------------------- specifications

    def spec(
        self,
        prompt: str | Sequence[str] = "",
        negative: str | Sequence[str | Term] | None = None,
        *,
        negative_scales: Sequence[float | None] | None = None,
        negative_windows: Sequence[Window | str | None] | None = None,
        rule: str = "sd",
        scale: float | None = None,
        steps: int | None = None,
        scheduler: str | None = None,
        seeds: Sequence[int] = (0,),
        size: int | tuple[int, int] | None = None,
        height: int | None = None,
        width: int | None = None,
        positive_window: Window | str | None = None,
        extra_positives: Sequence[Term] = (),
        eta: float = 0.0,
        rescale: float = 0.0,
        interval: Window | str | None = None,
        interval_sigma: tuple[float, float] | None = None,
        rule_settings: RuleSettings | Mapping[str, Any] | None = None,
        prompt_2: str | Sequence[str] | None = None,
        negative_2: str | Sequence[str | None] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        embedded_guidance: float | None = None,
    ) -> RunSpec:
        """A run on this session's model, with its defaults filled in.

        ``size``: a side (square) or (height, width); ``height``/``width`` alone keep the other side
        at the model's default; giving both ``size`` and a differing side is an error.
        ``rule_settings``: the rule's options (its Settings dataclass or a mapping of option names,
        e.g. ``{"strength": 3}`` for ``dng``). ``interval`` limits guidance to a window of steps; ``interval_sigma`` = (σ_lo, σ_hi) to the
        steps whose noise level σ = √((1 − ᾱ)/ᾱ) lies in that range (converted to steps here).

        SDXL only (an error on other models), named as in diffusers' ``StableDiffusionXLPipeline``:
        ``prompt_2``/``negative_2`` (the second text encoder's prompts; default the first's), the
        positive's micro-conditions ``original_size``, ``crops_coords_top_left``, ``target_size``
        (default: the image size, (0, 0)) and the negatives' ``negative_…`` ones (each default: the
        positive's). Sizes are (height, width), the crop corner (top, left).

        ``embedded_guidance``: the guidance scale w a guidance-distilled model takes as an input
        (default: its ``negprompt.json``'s ``embedded_guidance``); an error for other models. ``scale``
        stays the CFG scale s around it (such models declare s = 1: one pass per step).
        """
        micro = _micro(original_size, crops_coords_top_left, target_size)
        negative_micro = _micro(negative_original_size, negative_crops_coords_top_left, negative_target_size)
        sdxl_options = [
            name
            for name, value in (
                ("prompt_2", prompt_2),
                ("negative_2", negative_2),
                ("micro-conditions", micro),
                ("negative micro-conditions", negative_micro),
            )
            if value is not None
        ]
        family = self.components.family
        refused = [
            o for o in sdxl_options if not (family.second_prompt if o.endswith("_2") else family.size_conditioned)
        ]
        if refused:
            takers = "SDXL, SD3 and FLUX" if refused[0].endswith("_2") else "SDXL"
            raise SettingsError(
                f"{', '.join(refused)}: option(s) of {takers} models, but {self.model} is {family.description}; "
                f"give them for {takers} models only"
            )
        defaults = self.defaults
        if isinstance(positive_window, str):
            positive_window = Window.parse(positive_window)
        if isinstance(interval, str):
            interval = Window.parse(interval)
        scheduler = scheduler or defaults["scheduler"]
        steps = defaults["steps"] if steps is None else steps
        self.check_schedule(scheduler, steps)
        if interval_sigma is not None:
            if interval is not None:
                raise SettingsError("give the guidance interval as steps or as noise levels, not both")
            interval = interval_from_sigmas(interval_sigma, scheduler, steps, self.components)
        prompt_value = prompt if isinstance(prompt, str) else tuple(prompt)
        guidance = Guidance(
            rule=rule,
            positive=Term(
                prompt_value,
                None,
                positive_window or Window(),
                prompt_2 if prompt_2 is None or isinstance(prompt_2, str) else tuple(prompt_2),
                micro,
            ),
            negatives=negative_terms(negative, negative_scales, negative_windows, negative_2, negative_micro),
            scale=defaults["scale"] if scale is None else scale,
            extra_positives=tuple(extra_positives),
            rescale=rescale,
            interval=interval,
            settings=rule_settings,
        )
        guidance.rule_object.check_denoiser(self.components.denoiser)
        guidance.rule_object.check_prediction(prediction_type(self.components.scheduler))
        height, width = image_size(size, height, width, self.components.default_size)
        multiple = self.components.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise SettingsError(
                    f"{name} {value} is not a positive multiple of {multiple} (the model's size factor)"
                )
        return RunSpec(
            guidance=guidance,
            model=self.model,
            scheduler=scheduler,
            steps=steps,
            seeds=tuple(int(s) for s in seeds),
            height=height,
            width=width,
            eta=eta,
            device=self.device,
            dtype=self.dtype,
            embeddings=tuple((e.token, e.file, e.sha256) for e in self.components.embeddings.values()),
            embedded_guidance=self._embedded_guidance(embedded_guidance),
        )

    def _embedded_guidance(self, given: float | None) -> float | None:
        """The w of a guidance-distilled model (given, else declared), or None for other models."""
        takes_it = self.components.family.takes_embedded_guidance(self.components)
        if not takes_it:
            if given is not None:
                raise SettingsError(
                    f"embedded guidance {given} given, but {self.model} takes no guidance scale as an input "
                    "(only guidance-distilled models do); use --scale"
                )
            return None
        value = given if given is not None else self.defaults.get("embedded_guidance")
        if value is None:
            raise SettingsError(
                f"{self.model} takes the guidance scale as an input (guidance-distilled) and declares no default: "
                "give --embedded-guidance"
            )
        return float(value)

    def load_embedding(self, token: str, path: str | Path) -> Embedding:
        """Loads a textual-inversion embedding (safetensors) into every text encoder, used by ``token`` in
        any prompt (see :mod:`negprompt.models.embeddings`). Loading the same file under the same token
        again does nothing."""
        with self.lock:
            loaded = self.components.embeddings.get(token)
            if loaded is not None:
                digest = file_digest(check_embedding_source(token, path))
                if digest == loaded.sha256:
                    return loaded
                raise EmbeddingError(f"token {token!r} already names the embedding {loaded.file} ({loaded.sha256})")
            return add_embedding(self.components, token, path)

    # ---------------------------------------------------------------- running

    def run(
        self,
        spec: RunSpec,
        *,
        trace: bool = False,
        callback: StepCallback | None = None,
        unet_hooks: Sequence[UNetCallHook] = (),
        progress: bool = False,
    ) -> Generation:
        """Executes ``spec`` and returns its Generation (with the per-step trace if ``trace``)."""
        return self.run_together([spec], trace=trace, callback=callback, unet_hooks=unet_hooks, progress=progress)[0]

    def run_together(
        self,
        specs: Sequence[RunSpec],
        *,
        trace: bool = False,
        callback: StepCallback | None = None,
        unet_hooks: Sequence[UNetCallHook] = (),
        progress: bool = False,
    ) -> list[Generation]:
        """Runs several specs that differ only in guidance and seeds in one loop.

        Each spec's images equal those of running it alone (one UNet call per spec and step); steps
        the runs have in common (same seeds, prompts and state, e.g. a delayed negative before its
        window opens) are computed once. Returns one Generation per spec, in order.
        """
        first = specs[0]
        shared = (
            "model",
            "scheduler",
            "steps",
            "height",
            "width",
            "eta",
            "device",
            "dtype",
            "rows_per_call",
            "embedded_guidance",
        )
        for other in specs[1:]:
            differing = [name for name in shared if getattr(other, name) != getattr(first, name)]
            if differing:
                raise SettingsError(f"runs batched together must share {', '.join(differing)}")
        self.check_schedule(first.scheduler, first.steps)
        loaded = {(e.token, e.sha256) for e in self.components.embeddings.values()}
        for spec in specs:
            for token, file, digest in spec.embeddings:
                if (token, digest) not in loaded:
                    raise SettingsError(
                        f"the run uses the embedding {token!r} ({file}, sha256 {digest}), which this session has not "
                        f"loaded; load it first (--embedding {token}={file})"
                    )
        if (first.device, first.dtype) != (self.device, self.dtype):
            raise SettingsError(
                f"the run asks for {first.dtype} on {first.device} but this session holds the model in "
                f"{self.dtype} on {self.device}; make a Session with that device and dtype"
            )
        groups = [Group(s.guidance, s.seeds) for s in specs]
        with self.lock:
            components = self.components
            scheduler = make_scheduler(first.scheduler, components.scheduler)
            conditioning = encode_groups(components, groups, scheduler, first.steps, first.height, first.width)
            output = sample_groups(
                components,
                groups,
                scheduler,
                num_steps=first.steps,
                height=first.height,
                width=first.width,
                callback=callback,
                keep_trace=trace,
                unet_hooks=unet_hooks,
                progress=progress,
                eta=first.eta,
                max_rows_per_call=first.rows_per_call,
                embedded_guidance=first.embedded_guidance,
                conditioning=conditioning,
            )
        generations, start = [], 0
        for g, spec in enumerate(specs):
            count = len(spec.seeds)
            steps = None if output.trace is None else [info for info in output.trace if info.group == g]
            generations.append(
                Generation(
                    spec=spec,
                    pixels=output.images[start : start + count],
                    trace=steps,
                    unet_batch_rows=output.unet_batch_rows,
                    num_steps=output.num_steps,
                )
            )
            start += count
        return generations

    def generate(
        self,
        prompt: str | Sequence[str] = "",
        negative: str | Sequence[str | Term] | None = None,
        *,
        trace: bool = False,
        callback: StepCallback | None = None,
        progress: bool = False,
        **options: Any,
    ) -> Generation:
        """One image per seed; options are those of :meth:`spec`."""
        return self.run(self.spec(prompt, negative, **options), trace=trace, callback=callback, progress=progress)


def as_session(model: Session | str | Path | Components | None = None, **device_options: Any) -> Session:
    """``model`` if it is a session, else a new session loading it (``device``/``dtype`` options)."""
    if isinstance(model, Session):
        return model
    return Session(model, **device_options)


def image_size(
    size: int | tuple[int, int] | None, height: int | None, width: int | None, default: int
) -> tuple[int, int]:
    """(height, width) from a square ``size`` or (height, width) pair and/or explicit sides."""
    if size is None:
        from_size = None
    elif isinstance(size, int):
        from_size = (size, size)
    else:
        from_size = (int(size[0]), int(size[1]))
    if from_size is not None:
        for name, side, given in (("height", from_size[0], height), ("width", from_size[1], width)):
            if given is not None and given != side:
                raise SettingsError(
                    f"size {size} conflicts with {name} {given}; give a size (square) or a height and width"
                )
        return from_size
    return (default if height is None else int(height), default if width is None else int(width))


def negative_terms(
    negatives: str | Sequence[str | Term] | None,
    scales: Sequence[float | None] | None = None,
    windows: Sequence[Window | str | None] | None = None,
    seconds: str | Sequence[str | None] | None = None,
    micro: MicroConditions | None = None,
) -> tuple[Term, ...]:
    """Terms from negative prompt texts with optional per-negative scales, windows and (SDXL) second
    prompts, and the negatives' micro-conditions.

    One scale, window or second prompt given for several negatives applies to every negative (as one
    ``--negative-window`` would be read); otherwise give one per negative, in order. A second prompt
    or micro-conditions without a negative make an empty negative that carries them (as diffusers
    takes ``negative_prompt_2`` or ``negative_original_size`` without a ``negative_prompt``).
    """
    seconds = [seconds] if isinstance(seconds, str) else seconds
    if negatives is None:
        if seconds is None and micro is None:
            return ()
        negatives = ""
    items = [negatives] if isinstance(negatives, str) else list(negatives)
    count = len(items)

    def per_negative(values, what):
        if values is None:
            return [None] * count
        values = list(values)
        if len(values) == 1:
            return values * count
        if len(values) != count:
            raise SettingsError(
                f"{len(values)} {what} given for {count} negative prompt(s); give one for all or one per negative"
            )
        return values

    terms = []
    for item, scale, window, second in zip(
        items,
        per_negative(scales, "negative scales"),
        per_negative(windows, "negative windows"),
        per_negative(seconds, "second negative prompts"),
    ):
        if isinstance(item, Term):
            terms.append(item)
            continue
        if isinstance(window, str):
            window = Window.parse(window)
        terms.append(Term(item, scale, window or Window(), second, micro))
    return tuple(terms)


def interval_from_sigmas(sigmas: tuple[float, float], scheduler: str, steps: int, components: Components) -> Window:
    """The steps whose noise level σ lies in [σ_lo, σ_hi], as a window (σ falls step by step).

    σ at each (possibly fractional) timestep comes from :func:`negprompt.sampling.schedule.noise_level`,
    the same interpolation the sampling loop uses for ᾱ (flow matching: σ/(1 − σ); for FLUX, whose
    schedule shifts with the image size, at the model's default size).
    """
    low, high = sigmas
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        raise SettingsError(f"noise-level interval needs 0 ≤ σ_lo < σ_hi, got {low}:{high}")
    base = components.scheduler
    side = components.default_size
    settings = components.family.timestep_settings(components, steps, side, side)
    inside = [
        index
        for index, t in enumerate(timesteps_of(scheduler, base, steps, **settings))
        if low <= noise_level(base, t) <= high
    ]
    if not inside:
        raise SettingsError(f"no step of this schedule has a noise level σ in [{low}, {high}]")
    return Window(inside[0], inside[-1] + 1)


def _micro(original: Any, crop: Any, target: Any) -> MicroConditions | None:
    """Micro-conditions from the three optional values, None when none is given."""
    if original is None and crop is None and target is None:
        return None
    try:
        return MicroConditions(
            None if original is None else tuple(original),
            None if crop is None else tuple(crop),
            None if target is None else tuple(target),
        )
    except TypeError:
        raise SettingsError(
            f"micro-conditions must be pairs of whole numbers, got {original!r}, {crop!r}, {target!r}"
        ) from None


def respec(spec: RunSpec, session: Session) -> RunSpec:
    """``spec`` with the device and dtype of ``session`` (to rerun a recorded spec elsewhere)."""
    return replace(spec, device=session.device, dtype=session.dtype)


__all__ = ["Session", "RunSpec", "SettingsError", "as_session", "image_size", "interval_from_sigmas", "respec"]
