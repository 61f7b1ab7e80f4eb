"""A loaded model on a device, shared safely: build run specifications and run them.

>>> from negprompt import Session
>>> session = Session("shapes", device="auto", dtype="float32")
>>> spec = session.spec("a red circle", negative="a hat", seeds=[0, 1])
>>> session.run(spec).images[0].save("circle.png")

A :class:`Session` holds the model's parts with their device and dtype, and a lock that
serialises runs and attention-processor swaps, so a web server and a study can share one loaded
model. There is no module-level cache: keep the session to reuse the loaded model.

A run asked for as a :class:`~negprompt.runsettings.RunSettings` (or as ``spec``'s keywords) becomes a
:class:`~negprompt.runspec.RunSpec` here, with the model's defaults filled in. Settings are checked at
that edge, once for each kind: the RunSpec its own fields (types and bounds), :meth:`Session.check`
what depends on the model (schedule, size, the rule on this denoiser, windows on the schedule); the
sampling loop relies on both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from negprompt.devices import dtype_name, resolve_device, torch_dtype
from negprompt.guidance.plan import Guidance, MicroConditions, Term
from negprompt.guidance.windows import Window, check_sigma_interval
from negprompt.models.components import Components
from negprompt.models.conditioning import Conditioning, PromptInput
from negprompt.models.embeddings import Embedding, EmbeddingError, add_embedding, check_embedding_source, file_digest
from negprompt.models.loading import load_components
from negprompt.runsettings import RunSettings
from negprompt.runspec import Generation, RunSpec, SettingsError, check_steps
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
        family_defaults = self.components.family.sampling_defaults(self.components)
        return {**FALLBACK_DEFAULTS, **family_defaults, **self.components.declarations}

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
        positive's alone. ``spec`` is one this session checked (:meth:`spec_from`, :meth:`check`)."""
        calls = denoiser_calls(spec.scheduler, self.components.scheduler, spec.steps)
        guidance = spec.guidance
        used = {
            b for step in range(calls) for b in guidance.branches_at(step, calls) + guidance.contexts_at(step, calls)
        }
        return [
            str(term.prompt)
            for name, term in guidance.terms.items()
            if name.startswith("negative") and name not in used
        ]

    # ---------------------------------------------------------------- checks (the model-dependent edge)

    def check(self, spec: RunSpec) -> None:
        """Raises a one-line :class:`~negprompt.errors.NegpromptError` unless ``spec`` can run on this
        model: its schedule (:meth:`check_schedule`), its size and frames, its rule on this denoiser and its
        windows and prompt edits on the schedule. :meth:`spec_from` makes only specs that pass;
        :meth:`run_together` checks every spec it is given (they also come from a PNG's JSON or
        ``dataclasses.replace``). The sampling loop below relies on these checks."""
        self.check_schedule(spec.scheduler, spec.steps)
        self._check_size(spec.height, spec.width)
        self._check_rule(spec.guidance)
        self._check_windows(spec.guidance, spec.scheduler, spec.steps)
        self.components.family.check_video(self.components, spec.frames, spec.guidance.scale, spec.scale_2)

    def check_schedule(self, scheduler: str, steps: int) -> None:
        """Raises :class:`SettingsError` unless ``steps`` is a whole number in 1–1000 and, where the model
        declares ``max_sigma``, the schedule's first noise level σ is at most that (see docs/training.md)."""
        check_steps(steps)
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

    def _check_size(self, height: int, width: int) -> None:
        """Both sides positive multiples of the model's size factor."""
        multiple = self.components.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % multiple:
                raise SettingsError(
                    f"{name} {value} is not a positive multiple of {multiple} (the model's size factor)"
                )

    def _check_rule(self, guidance: Guidance) -> None:
        """The rule acts on this denoiser and is exact on its predictions (e.g. velocities)."""
        guidance.rule_object.check_attention(self.components.attention_layout)
        guidance.rule_object.check_prediction(prediction_type(self.components.scheduler))

    def _check_windows(self, guidance: Guidance, scheduler: str, steps: int) -> None:
        """Every window, the interval and every prompt edit fit the schedule's denoiser calls, and the model's
        family takes the guidance (e.g. a step-distilled model only its positive branch)."""
        calls = denoiser_calls(scheduler, self.components.scheduler, steps)
        guidance.validate(calls)
        self.components.family.check_guidance(self.components, guidance, calls)

    # ---------------------------------------------------------------- specifications

    def spec(
        self, prompt: str | Sequence[str] = "", negative: str | Sequence[str | Term] | None = None, **options: Any
    ) -> RunSpec:
        """A run on this session's model, with its defaults filled in: :meth:`spec_from` of
        ``RunSettings(prompt, negative, **options)``; the options are the fields of
        :class:`~negprompt.runsettings.RunSettings` (``steps``, ``seeds``, ``rule``, ``size`` …)."""
        return self.spec_from(RunSettings(prompt, negative, **options))

    def spec_from(self, settings: RunSettings) -> RunSpec:
        """The run ``settings`` ask for on this session's model, checked (see :meth:`check`), with the
        model's defaults for what they leave out.

        ``size`` and a differing ``height``/``width`` are an error. ``interval_sigma`` becomes the
        window of steps whose noise level σ = √((1 − ᾱ)/ᾱ) lies in that range. The SDXL options (on
        other models an error) default as in diffusers' ``StableDiffusionXLPipeline``: the second
        prompts to the first's, the positive's micro-conditions to the image size and (0, 0), the
        negatives' to the positive's; sizes are (height, width), the crop corner (top, left).
        ``embedded_guidance`` defaults to the model's declared one (its ``negprompt.json``) and is an
        error for models that take none; ``scale`` stays the CFG scale s around it (such models
        declare s = 1: one pass per step).
        """
        micro, negative_micro = self._sdxl_options(settings)
        defaults = self.defaults
        windows = (settings.positive_window, settings.interval)  # a Window, None, or its text
        positive_window, interval = (Window.parse(w) if isinstance(w, str) else w for w in windows)
        scheduler = settings.scheduler or defaults["scheduler"]
        steps = defaults["steps"] if settings.steps is None else settings.steps
        self.check_schedule(scheduler, steps)
        if settings.interval_sigma is not None:
            if interval is not None:
                raise SettingsError("give the guidance interval as steps or as noise levels, not both")
            interval = interval_from_sigmas(settings.interval_sigma, scheduler, steps, self.components)
        guidance = self._guidance(settings, positive_window, interval, micro, negative_micro)
        self._check_rule(guidance)
        height, width = image_size(settings.size, settings.height, settings.width, self.components.default_size)
        self._check_size(height, width)
        spec = RunSpec(
            guidance=guidance,
            model=self.model,
            scheduler=scheduler,
            steps=steps,
            seeds=tuple(int(s) for s in settings.seeds),
            height=height,
            width=width,
            eta=settings.eta,
            device=self.device,
            dtype=self.dtype,
            embeddings=tuple((e.token, e.file, e.sha256) for e in self.components.embeddings.values()),
            embedded_guidance=self._embedded_guidance(settings.embedded_guidance),
            frames=defaults.get("frames", 1) if settings.frames is None else settings.frames,
            scale_2=settings.scale_2,
        )
        self._check_windows(guidance, scheduler, steps)
        self.components.family.check_video(self.components, spec.frames, guidance.scale, spec.scale_2)
        return spec

    def _sdxl_options(self, settings: RunSettings) -> tuple[MicroConditions | None, MicroConditions | None]:
        """The positive's and the negatives' micro-conditions ``settings`` give, once this model is known to read
        every SDXL option they set (see :meth:`_check_family_options`)."""
        micro = _micro(settings.original_size, settings.crops_coords_top_left, settings.target_size)
        negative_micro = _micro(
            settings.negative_original_size, settings.negative_crops_coords_top_left, settings.negative_target_size
        )
        options = {"prompt_2": settings.prompt_2, "negative_2": settings.negative_2, "micro-conditions": micro}
        self._check_family_options({**options, "negative micro-conditions": negative_micro})
        return micro, negative_micro

    def _guidance(
        self,
        settings: RunSettings,
        positive_window: Window | None,
        interval: Window | None,
        micro: MicroConditions | None,
        negative_micro: MicroConditions | None,
    ) -> Guidance:
        """The guidance ``settings`` ask for (checked by ``Guidance`` itself), the model's scale by default."""
        prompt, prompt_2 = settings.prompt, settings.prompt_2
        return Guidance(
            rule=settings.rule,
            positive=Term(
                prompt if isinstance(prompt, str) else tuple(prompt),
                None,
                positive_window or Window(),
                prompt_2 if prompt_2 is None or isinstance(prompt_2, str) else tuple(prompt_2),
                micro,
            ),
            negatives=negative_terms(
                settings.negative,
                settings.negative_scales,
                settings.negative_windows,
                settings.negative_2,
                negative_micro,
            ),
            scale=self.defaults["scale"] if settings.scale is None else settings.scale,
            extra_positives=tuple(settings.extra_positives),
            rescale=settings.rescale,
            interval=interval,
            settings=settings.rule_settings,
        )

    def _check_family_options(self, given: Mapping[str, Any]) -> None:
        """Refuses the SDXL options (``…_2`` prompts; micro-conditions) the model's family does not read."""
        family = self.components.family
        refused = [
            name
            for name, value in given.items()
            if value is not None and not (family.second_prompt if name.endswith("_2") else family.size_conditioned)
        ]
        if refused:
            takers = "SDXL, SD3 and FLUX" if refused[0].endswith("_2") else "SDXL"
            raise SettingsError(
                f"{', '.join(refused)}: option(s) of {takers} models, but {self.model} is {family.description}; "
                f"give them for {takers} models only"
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
        self._check_together(specs)
        first = specs[0]
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
                frames=first.frames,
                scales_2=[spec.scale_2 for spec in specs],
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
                    negative_stops=output.negative_stops[g],
                )
            )
            start += count
        return generations

    def _check_together(self, specs: Sequence[RunSpec]) -> None:
        """Specs run together share everything but guidance and seeds, each fits the model
        (:meth:`check`: also specs read from a PNG or made by ``replace``), their embeddings are loaded,
        and the session holds the model on their device in their dtype."""
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
            "frames",
        )
        for other in specs[1:]:
            differing = [name for name in shared if getattr(other, name) != getattr(first, name)]
            if differing:
                raise SettingsError(f"runs batched together must share {', '.join(differing)}")
        for spec in specs:
            self.check(spec)
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
    check_sigma_interval(low, high)
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


__all__ = [
    "RunSettings",
    "RunSpec",
    "Session",
    "SettingsError",
    "as_session",
    "image_size",
    "interval_from_sigmas",
    "respec",
]
