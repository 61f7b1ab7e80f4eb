"""Command-line options shared by the built-in commands and command plugins: the API a plugin's
``register(subparsers)`` (entry-point group ``negprompt.commands``) builds its commands with.

- option types: ``type=`` callables for argparse (:func:`positive_int`, :func:`seed_list`, …);
- ``add_*_options``: groups of flags added to a command's parser;
- checks that read the parsed arguments on their own (:func:`check_prompt_args`), before anything heavy
  is imported;
- conversions from parsed arguments to run settings: :func:`run_settings_from_args` (what
  :meth:`Session.spec_from <negprompt.session.Session.spec_from>` takes), :func:`session_from_args` (which also quiets
  the libraries' loading chatter), :func:`size_pair`.

Importing this module costs argparse only: torch, diffusers and the model code are imported by the
functions that need them, after the checks.

A handler returns an exit code, or a :class:`CommandResult` to have warnings printed after it succeeded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from negprompt.interfaces.option_types import (  # noqa: F401 (re-exported: the option types are plugin API)
    CommandError,
    embedding_option,
    finite_number,
    frame_count,
    guidance_scale,
    image_side,
    negative_period,
    non_negative_int,
    number,
    number_range,
    positive_int,
    positive_number,
    seed_list,
    sigma_range,
    size_condition,
    step_count,
    whole_number,
)
from negprompt.runsettings import RunSettings


@dataclass(frozen=True)
class CommandResult:
    """What a handler may return instead of a bare exit code: the code, and warnings that ``negprompt``
    prints on stderr once the command has succeeded (so a usage error stays one line)."""

    code: int = 0
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------- groups of flags

SDXL_SIZE_OPTIONS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)
MODEL_HELP = "diffusers directory, cached model id, 'shapes' (default) or 'shapes-distilled'"


class GivenOnce(argparse.Action):
    """An option that may be given once: a second ``--seed 1 --seed 2`` would silently drop the first."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option=None):
        given = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            parser.error(f"{option} given twice; give every value in one (e.g. {option} 1,2 or 0-7)")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that generates: prompt, negatives, rule, sampler, model."""
    from negprompt.guidance.rules import all_rules
    from negprompt.sampling.schedulers import SCHEDULER_NAMES

    parser.add_argument("prompt", nargs="?", default=None, help="the positive prompt (may be empty: unconditional)")
    parser.add_argument(
        "-n", "--negative", action="append", metavar="TEXT", help="a negative prompt (repeatable; default none)"
    )
    parser.add_argument(
        "--negative-scale",
        action="append",
        type=number,
        metavar="S",
        help="s⁻ of each negative, in order (rules dual, weighted; default s − 1)",
    )
    parser.add_argument(
        "--negative-window",
        action="append",
        metavar="START:END",
        help="steps in which each negative is active, in order: 5: or 0.2:0.8 or :10, or START:auto to stop "
        "computing it where its effect has converged (rules sd, dual; default all)",
    )
    parser.add_argument(
        "--negative-every",
        type=negative_period,
        default=None,
        metavar="K",
        help="compute each negative every K-th step of its window, reusing its difference in between "
        "(rules sd, dual; default 1: every step)",
    )
    rules = "; ".join(f"{rule.name}: {rule.summary}" for rule in all_rules().values())
    parser.add_argument("--rule", default="sd", help=f"guidance rule (default sd) — {rules}")
    parser.add_argument(
        "--scale", type=guidance_scale, default=None, help="guidance scale s (s⁺); default: the model's"
    )
    parser.add_argument("--steps", type=step_count, default=None, help="inference steps, 1–1000; default: the model's")
    parser.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULER_NAMES)}; default: the model's")
    parser.add_argument(
        "--seed", type=seed_list, action=GivenOnce, default=None, help="seed(s): 3, 0,1,2 or 0-7 (default 0)"
    )
    parser.add_argument("--size", type=image_side, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_quiet_option(parser)
    add_modifier_options(parser)
    add_rule_options(parser)
    add_run_options(parser)
    add_sdxl_options(parser)


def add_modifier_options(parser: argparse.ArgumentParser) -> None:
    """The group "more guidance rules and modifiers": rescale, embedded guidance, intervals."""
    more = parser.add_argument_group("more guidance rules and modifiers")
    more.add_argument("--rescale", type=number, default=0.0, help="guidance rescale φ in [0, 1] (default 0: off)")
    more.add_argument(
        "--embedded-guidance",
        type=number,
        default=None,
        metavar="W",
        help="guidance scale w given as an input to a guidance-distilled model (default: the model's)",
    )
    more.add_argument(
        "--scale-2",
        type=guidance_scale,
        default=None,
        metavar="S",
        help="guidance scale of a second expert's steps (Wan 2.2's low-noise transformer; default --scale)",
    )
    more.add_argument(
        "--interval",
        default=None,
        metavar="START:END",
        help="guide only in these steps; elsewhere ε̂ = ε_y (default: every step)",
    )
    more.add_argument(
        "--interval-sigma",
        default=None,
        metavar="LO:HI",
        help="guide only where the noise level σ is in [LO, HI] (default: every step)",
    )


def add_sdxl_options(parser: argparse.ArgumentParser) -> None:
    """Textual-inversion embeddings (any model) and SDXL's second prompts and micro-conditions."""
    parser.add_argument(
        "--embedding",
        action="append",
        type=embedding_option,
        metavar="TOKEN=FILE",
        help="load a textual-inversion embedding (safetensors) used by TOKEN in any prompt (repeatable; default none)",
    )
    group = parser.add_argument_group("SDXL only (named as in diffusers' StableDiffusionXLPipeline)")
    group.add_argument(
        "--prompt-2", default=None, metavar="TEXT", help="the second text encoder's prompt (default: the prompt)"
    )
    group.add_argument(
        "--negative-2",
        action="append",
        metavar="TEXT",
        help="the second text encoder's negative, one for all or one per --negative (default: the negative)",
    )
    for dest in SDXL_SIZE_OPTIONS:
        corner = "crops" in dest
        negative = dest.startswith("negative")
        default = "the positive's" if negative else ("0,0" if corner else "the image size")
        group.add_argument(
            "--" + dest.replace("_", "-"),
            type=size_condition,
            default=None,
            metavar="TOP,LEFT" if corner else "H,W",
            help=f"micro-condition{' of the negatives' if negative else ''} (default {default})",
        )


def add_rule_options(parser: argparse.ArgumentParser) -> None:
    """One group per rule with options: flags, types, defaults and help from the rule's settings."""
    from negprompt.guidance.rules import all_rules

    for rule in all_rules().values():
        options = rule.Settings.options()
        if not options:
            continue
        group = parser.add_argument_group(f"options of rule {rule.name} (--rule {rule.name})")
        for option in options:
            kind = rule.Settings.kind(option)
            unit = f" {option.metadata['unit']}" if option.metadata.get("unit") else ""
            group.add_argument(
                rule.Settings.flag(option),
                dest=rule_option_dest(rule.name, option.name),
                type=whole_number if kind is int else str if kind is str else number,
                default=None,
                metavar="N" if kind is int else "TEXT" if kind is str else "X",
                help=f"{option.metadata['help']} (default {option.default}{unit})",
            )


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    """-q/--quiet: no progress bar."""
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: a bar on stderr)")


def add_model_options(parser: argparse.ArgumentParser, scale: bool = True) -> None:
    """--model, --steps, --scheduler (and --scale) of commands that are not prompt commands."""
    from negprompt.sampling.schedulers import SCHEDULER_NAMES

    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--steps", type=step_count, default=None, help="inference steps, 1–1000 (default: the model's)")
    parser.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULER_NAMES)} (default: the model's)")
    if scale:
        parser.add_argument(
            "--scale", type=guidance_scale, default=None, help="guidance scale s (default: the model's)"
        )


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, for every command that loads a model to generate."""
    from negprompt.devices import DEVICE_CHOICES, DTYPES

    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help=f"{'|'.join(DEVICE_CHOICES)} (default auto: CUDA if available, then MPS, else CPU)",
    )
    group.add_argument("--dtype", default=None, metavar="DTYPE", help=f"{'|'.join(DTYPES)} (default float32)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Image shape and device options of the prompt commands (generate, attend, edit)."""
    parser.add_argument("--width", type=image_side, default=None, help="image width in pixels (default: --size)")
    parser.add_argument("--height", type=image_side, default=None, help="image height in pixels (default: --size)")
    parser.add_argument(
        "--frames",
        type=frame_count,
        default=None,
        help="frames of each video, video models only (Wan: 4k + 1; default: the model's, 81 for Wan)",
    )
    add_device_options(parser)


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """--no-overwrite: refuse to replace existing outputs."""
    parser.add_argument(
        "--no-overwrite",
        action="store_true",
        help="refuse to run if an output file (or a non-empty output folder) exists (default: replace it, "
        "saying 'replaced')",
    )


# ---------------------------------------------------------------- rule options


def rule_option_dest(rule: str, option: str) -> str:
    """The argparse ``dest`` of a rule's option."""
    return f"rule_option__{rule.replace('-', '_')}__{option}"


def rule_option_flags() -> dict[str, str]:
    """dest → flag of every rule option on the command line."""
    from negprompt.guidance.rules import all_rules

    return {
        rule_option_dest(rule.name, option.name): rule.Settings.flag(option)
        for rule in all_rules().values()
        for option in rule.Settings.options()
    }


def rule_options_from_args(args: argparse.Namespace) -> dict:
    """The selected rule's options given on the command line; an option of another rule is an error."""
    from negprompt.guidance.rules import all_rules

    chosen: dict = {}
    for rule in all_rules().values():
        for option in rule.Settings.options():
            value = getattr(args, rule_option_dest(rule.name, option.name), None)
            if value is None:
                continue
            if rule.name != args.rule:
                flag = rule.Settings.flag(option)
                raise CommandError(
                    f"{flag} is an option of rule {rule.name!r}, but the rule is {args.rule!r}; "
                    f"add --rule {rule.name} or drop {flag}"
                )
            chosen[option.name] = value
    return chosen


# ---------------------------------------------------------------- checks


def check_prompt_args(args: argparse.Namespace) -> None:
    """Checks what the prompt options say on their own, before anything is imported or loaded: rule
    and scheduler names, options of another rule, sizes, windows, σ-interval, prompt syntax and weights,
    device and dtype names."""
    from negprompt.guidance import syntax
    from negprompt.guidance.rules import rule_named
    from negprompt.guidance.rules.base import check_scale
    from negprompt.guidance.windows import Window, check_sigma_interval
    from negprompt.sampling.schedulers import SCHEDULER_NAMES

    rule = rule_named(args.rule)
    if args.scheduler is not None and args.scheduler not in SCHEDULER_NAMES:
        raise CommandError(f"unknown scheduler {args.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    for value in args.negative_scale or []:
        check_scale(value, "negative scale")
    rule.Settings(**rule_options_from_args(args)).validate()  # the model's defaults cannot make them valid
    size_from_args(args)
    for text in [*(args.negative_window or []), *([args.interval] if args.interval else [])]:
        Window.parse(text)
    check_economy_args(args, rule.name)
    if args.interval_sigma:
        check_sigma_interval(*sigma_range(args.interval_sigma))
    for prompt in [args.prompt or "", *(args.negative or []), args.prompt_2 or "", *(args.negative_2 or [])]:
        syntax.parse(prompt)
    for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
        value = getattr(args, name, None)
        if value is not None and min(value) < 1:
            raise CommandError(
                f"--{name.replace('_', '-')} {value[0]},{value[1]}: sizes must be positive (height,width)"
            )
    check_embedding_args(args)
    check_device_names(args)


def check_economy_args(args: argparse.Namespace, rule: str) -> None:
    """An auto end (--negative-window START:auto) or --negative-every K > 1 needs negatives computed as
    denoiser branches (rules sd, dual); the interval takes neither."""
    from negprompt.guidance.windows import Window

    if args.interval and Window.parse(args.interval).is_auto:
        raise CommandError(f"--interval {args.interval}: the guidance interval cannot end at auto; give START:END")
    autos = [text for text in args.negative_window or [] if Window.parse(text).is_auto]
    check_negative_economy(rule, len(args.negative or []), getattr(args, "negative_every", None), autos)


def check_negative_economy(rule: str, negatives: int, every: int | None, auto_windows: list[str]) -> None:
    """The one check of cheap negatives, for the command line and the page alike (the same line for the same
    settings): an auto end (``auto_windows``: the START:auto texts of --negative-window) or a period K > 1
    (--negative-every K) needs a negative prompt and a rule whose negatives are denoiser branches (sd, dual).
    K = 1 (or None) is every step, the default: it asks for nothing, under any rule."""
    from negprompt.guidance.economy import ECONOMY_RULES

    asked = [f"--negative-window {text}" for text in auto_windows]
    if every is not None and every > 1:
        asked.append(f"--negative-every {every}")
    if not asked:
        return
    if not negatives:
        raise CommandError(f"{asked[0]} needs a negative prompt (-n TEXT)")
    if rule not in ECONOMY_RULES:
        raise CommandError(
            f"{asked[0]} needs a negative computed as a denoiser branch; rule {rule!r} has none that can be "
            f"stopped or reused: use --rule {' or '.join(ECONOMY_RULES)}"
        )


def check_device_names(args: argparse.Namespace) -> None:
    """--device and --dtype, when given, name a known device and dtype."""
    from negprompt.devices import DEVICE_CHOICES, DTYPES

    if args.device is not None and args.device not in DEVICE_CHOICES:
        raise CommandError(f"unknown device {args.device!r}; accepted: {', '.join(DEVICE_CHOICES)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise CommandError(f"unknown dtype {args.dtype!r}; accepted: {', '.join(DTYPES)}")


def check_embedding_args(args: argparse.Namespace) -> None:
    """Each --embedding names a safetensors file that exists, by a token of the right form."""
    from negprompt.models.embeddings import check_embedding_source

    for token, path in getattr(args, "embedding", None) or []:
        check_embedding_source(token, path)


def folder_outputs(args: argparse.Namespace) -> list[Path]:
    """Checks the output folder ``args.out`` before any work; returns the files already in it (to say
    which get replaced). With --no-overwrite a non-empty folder is an error."""
    from negprompt.interfaces.outputs import check_destination, refuse_existing

    check_destination(args.out, folder=True)
    out = Path(args.out)
    existing = sorted(out.iterdir()) if out.is_dir() else []
    if args.no_overwrite:
        refuse_existing(existing)
    return existing


# ---------------------------------------------------------------- parsed arguments → run settings


def size_from_args(args: argparse.Namespace) -> dict:
    """--size (square) or --width/--height, as :meth:`Session.spec` keywords; a conflict is an error."""
    for name in ("width", "height"):
        given = getattr(args, name, None)
        if args.size is not None and given is not None and given != args.size:
            raise CommandError(
                f"--size {args.size} conflicts with --{name} {given}; give --size for a square, or --width and --height"
            )
    return dict(size=args.size, width=getattr(args, "width", None), height=getattr(args, "height", None))


def size_pair(args: argparse.Namespace, session):
    """--size, or (height, width) when --width/--height are given (the other side: --size or the model's)."""
    size = size_from_args(args)
    if size["width"] is None and size["height"] is None:
        return args.size
    default = args.size or session.components.default_size
    return (size["height"] or default, size["width"] or default)


def sdxl_from_args(args: argparse.Namespace) -> dict:
    """The SDXL keywords of :meth:`Session.spec` that were given."""
    given = {name: getattr(args, name) for name in SDXL_SIZE_OPTIONS if getattr(args, name, None) is not None}
    if args.prompt_2 is not None:
        given["prompt_2"] = args.prompt_2
    if args.negative_2:
        given["negative_2"] = args.negative_2
    return given


def run_settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run the prompt options (:func:`add_prompt_options`) describe, as
    :class:`~negprompt.runsettings.RunSettings`: ``session.spec_from(run_settings_from_args(args))`` is
    the run the command line asks for. The one place that turns parsed arguments into run settings."""
    return RunSettings(
        args.prompt or "",
        args.negative,
        negative_scales=args.negative_scale,
        negative_windows=negative_windows_from_args(args),
        rule=args.rule,
        scale=args.scale,
        steps=args.steps,
        scheduler=args.scheduler,
        seeds=args.seed or [0],
        **size_from_args(args),
        rescale=args.rescale,
        interval=args.interval,
        interval_sigma=sigma_range(args.interval_sigma) if args.interval_sigma else None,
        rule_settings=rule_options_from_args(args),
        embedded_guidance=args.embedded_guidance,
        frames=getattr(args, "frames", None),
        scale_2=getattr(args, "scale_2", None),
        **sdxl_from_args(args),
    )


def negative_windows_from_args(args: argparse.Namespace) -> list | None:
    """--negative-window as given; with --negative-every K > 1, each negative's window (default: all steps)
    parsed and given the period K (K = 1, every step, is the default: the windows as given)."""
    every = getattr(args, "negative_every", None)
    if every is None or every == 1:
        return args.negative_window
    from negprompt.guidance.windows import Window

    texts = list(args.negative_window or [])
    texts += [":"] * (len(args.negative or []) - len(texts))
    windows = []
    for text in texts:
        window = Window.parse(text)
        windows.append(Window(window.start, window.end, every))
    return windows


def unused_negative_warnings(session, spec) -> tuple[str, ...]:
    """A warning for negative prompts that take no part in the run ``spec`` (rule sd at scale 1), else none."""
    unused = session.unused_negatives(spec)
    if not (unused and spec.guidance.scale == 1):
        return ()
    return (
        f"the negative prompt(s) {', '.join(repr(u) for u in unused)} took no part in this run: rule "
        f"{spec.guidance.rule!r} at scale 1 evaluates the positive alone; give a scale above 1 (on FLUX: "
        "true CFG, a second pass) or --rule nag or vsf (one pass)",
    )


def session_from_args(args: argparse.Namespace, spec=None, model=None):
    """The session of a command: ``model``, else ``spec``'s model, else --model, on --device in --dtype
    (else ``spec``'s, else auto and float32); both are checked before anything is loaded. The
    --embedding files are loaded into it, and the libraries are quieted first (:func:`quiet_libraries`)."""
    from negprompt.devices import resolve_device, torch_dtype
    from negprompt.session import Session

    quiet_libraries()
    device = args.device if args.device is not None else (spec.device if spec is not None else "auto")
    dtype = args.dtype if args.dtype is not None else (spec.dtype if spec is not None else "float32")
    resolve_device(device)
    torch_dtype(dtype)
    if model is None:
        model = spec.model if spec is not None else getattr(args, "model", None)
    check_embedding_args(args)
    session = Session(model, device=device, dtype=dtype)
    for token, path in getattr(args, "embedding", None) or []:
        session.load_embedding(token, path)
    return session


def quiet_libraries() -> None:
    """Keeps diffusers' and transformers' loading chatter (progress bars, hints) off the terminal, for the
    rest of the process: the command line's policy once it loads a model. (It stays here, at the load,
    rather than in ``main``: the parser must not import diffusers, and commands that load no session,
    such as ``train``, keep the libraries' output.)"""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
