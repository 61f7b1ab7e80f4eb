"""The ``negprompt`` command.

Every error a user can cause ends in one line on stderr, ``negprompt: error: …``, exit code 2,
and no output file; it is found before any long work starts, and ``--help`` and the parser's errors
come without importing torch or diffusers. A failure of the machine during the work (a full disk)
ends in one line ``negprompt: failed: …`` and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from negprompt.errors import NegpromptError, one_line
from negprompt.limits import MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS

EXIT_USAGE = 2  # the input: a one-line message, nothing written
EXIT_FAILED = 1  # the machine failed during the work (e.g. a full disk): a one-line message
COMMANDS_GROUP = "negprompt.commands"  # entry points: register(subparsers) functions of plugins


class CommandError(NegpromptError):
    """A user error found by a command itself."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one :class:`CommandError` line instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise CommandError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- shared options


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def non_negative_int(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give 0 or more")
    return value


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (1 or more)")
    return value


def step_count(text: str) -> int:
    value = whole_number(text)
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{text!r} steps: give 1–{MAX_STEPS}")
    return value


def image_side(text: str) -> int:
    value = whole_number(text)
    if not 1 <= value <= MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{text!r} pixels: give 1–{MAX_SIDE}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def seed_list(text: str) -> list[int]:
    """``3`` or ``0,1,2`` or ``0-7``: seeds in 0–2⁶⁴−1, at most MAX_IMAGES of them."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                low, high = (int(x) for x in part.split("-", 1))
                if high < low:
                    raise argparse.ArgumentTypeError(
                        f"seed range {part.strip()!r} runs backwards; write it low-high, e.g. {high}-{low}"
                    )
                bounds = [low, high]
            else:
                low = high = int(part)
                bounds = [low]
            for seed in bounds:
                if not 0 <= seed <= MAX_SEED:
                    raise argparse.ArgumentTypeError(f"seed {seed} is outside 0–{MAX_SEED} (a 64-bit generator seed)")
            if len(seeds) + high - low + 1 > MAX_IMAGES:
                raise argparse.ArgumentTypeError(f"seeds {text!r} make over {MAX_IMAGES} images; run them in parts")
            seeds.extend(range(low, high + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: give integers like 3, 0,1,2 or 0-7") from None
    return seeds


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
        help="steps in which each negative is active, in order: 5: or 0.2:0.8 or :10 (default all)",
    )
    rules = "; ".join(f"{rule.name}: {rule.summary}" for rule in all_rules().values())
    parser.add_argument("--rule", default="sd", help=f"guidance rule (default sd) — {rules}")
    parser.add_argument("--scale", type=number, default=None, help="guidance scale s (s⁺); default: the model's")
    parser.add_argument("--steps", type=step_count, default=None, help="inference steps, 1–1000; default: the model's")
    parser.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULER_NAMES)}; default: the model's")
    parser.add_argument("--seed", type=seed_list, default=None, help="seed(s): 3, 0,1,2 or 0-7 (default 0)")
    parser.add_argument("--size", type=image_side, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument(
        "--model", default=None, help="diffusers directory, cached model id, 'shapes' (default) or 'shapes-distilled'"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: a bar on stderr)")
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
    add_rule_options(parser)
    add_run_options(parser)
    add_sdxl_options(parser)


SDXL_SIZE_OPTIONS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


def size_condition(text: str) -> tuple[int, int]:
    """``H,W`` (or ``TOP,LEFT``): two whole numbers ≥ 0."""
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be two whole numbers like 1024,1024 (height,width)") from None
    if first < 0 or second < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be two whole numbers ≥ 0")
    return first, second


def embedding_option(text: str) -> tuple[str, str]:
    token, sep, path = text.partition("=")
    if not sep or not token or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r} must look like TOKEN=FILE.safetensors, e.g. easynegative=en.safetensors"
        )
    return token, path


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
                type=whole_number if kind is int else number,
                default=None,
                metavar="N" if kind is int else "X",
                help=f"{option.metadata['help']} (default {option.default}{unit})",
            )


def rule_option_flags() -> dict[str, str]:
    """dest → flag of every rule option on the command line."""
    from negprompt.guidance.rules import all_rules

    return {
        rule_option_dest(rule.name, option.name): rule.Settings.flag(option)
        for rule in all_rules().values()
        for option in rule.Settings.options()
    }


def rule_option_dest(rule: str, option: str) -> str:
    return f"rule_option__{rule.replace('-', '_')}__{option}"


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


def add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar (default: a bar on stderr)")


def add_model_options(parser: argparse.ArgumentParser, scale: bool = True) -> None:
    """--model, --steps, --scheduler (and --scale) of commands that are not prompt commands."""
    from negprompt.sampling.schedulers import SCHEDULER_NAMES

    parser.add_argument(
        "--model", default=None, help="diffusers directory, cached model id, 'shapes' (default) or 'shapes-distilled'"
    )
    parser.add_argument("--steps", type=step_count, default=None, help="inference steps, 1–1000 (default: the model's)")
    parser.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULER_NAMES)} (default: the model's)")
    if scale:
        parser.add_argument("--scale", type=number, default=None, help="guidance scale s (default: the model's)")


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
    add_device_options(parser)


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-overwrite",
        action="store_true",
        help="refuse to run if an output file (or a non-empty output folder) exists (default: replace it, "
        "saying 'replaced')",
    )


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


def session_from_args(args: argparse.Namespace, spec=None, model=None):
    """The session of a command: ``model``, else ``spec``'s model, else --model, on --device in --dtype
    (else ``spec``'s, else auto and float32); both are checked before anything is loaded."""
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


def number_range(text: str, flag: str, example: str) -> tuple[float, float]:
    """``LO:HI`` given to ``flag`` as two numbers; a one-line error shows ``example``."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise CommandError(f"{flag} {text!r} must look like LO:HI, e.g. {example}") from None
    return low, high


def sigma_range(text: str) -> tuple[float, float]:
    return number_range(text, "--interval-sigma", "0.3:5")


def check_prompt_args(args: argparse.Namespace) -> None:
    """Checks what the prompt options say on their own, before anything is imported or loaded: rule
    and scheduler names, options of another rule, sizes, windows, σ-interval, prompt syntax and weights,
    device and dtype names."""
    from negprompt.devices import DEVICE_CHOICES, DTYPES
    from negprompt.guidance import syntax
    from negprompt.guidance.rules import rule_named
    from negprompt.guidance.windows import Window
    from negprompt.sampling.schedulers import SCHEDULER_NAMES

    rule_named(args.rule)
    if args.scheduler is not None and args.scheduler not in SCHEDULER_NAMES:
        raise CommandError(f"unknown scheduler {args.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    rule_options_from_args(args)
    size_from_args(args)
    for text in [*(args.negative_window or []), *([args.interval] if args.interval else [])]:
        Window.parse(text)
    if args.interval_sigma:
        sigma_range(args.interval_sigma)
    for prompt in [args.prompt or "", *(args.negative or []), args.prompt_2 or "", *(args.negative_2 or [])]:
        syntax.parse(prompt)
    for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
        value = getattr(args, name, None)
        if value is not None and min(value) < 1:
            raise CommandError(
                f"--{name.replace('_', '-')} {value[0]},{value[1]}: sizes must be positive (height,width)"
            )
    check_embedding_args(args)
    if args.device is not None and args.device not in DEVICE_CHOICES:
        raise CommandError(f"unknown device {args.device!r}; accepted: {', '.join(DEVICE_CHOICES)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise CommandError(f"unknown dtype {args.dtype!r}; accepted: {', '.join(DTYPES)}")


def check_embedding_args(args: argparse.Namespace) -> None:
    """Each --embedding names a safetensors file that exists, by a token of the right form."""
    from negprompt.models.embeddings import check_embedding_source

    for token, path in getattr(args, "embedding", None) or []:
        check_embedding_source(token, path)


def sdxl_from_args(args: argparse.Namespace) -> dict:
    """The SDXL keywords of :meth:`Session.spec` that were given."""
    given = {name: getattr(args, name) for name in SDXL_SIZE_OPTIONS if getattr(args, name, None) is not None}
    if args.prompt_2 is not None:
        given["prompt_2"] = args.prompt_2
    if args.negative_2:
        given["negative_2"] = args.negative_2
    return given


def settings_from_args(args: argparse.Namespace, session):
    """The run specification the prompt options describe, on ``session``'s model. A negative prompt that
    takes no part in the run (rule sd at scale 1) is noted in ``args.warnings``, printed once the command
    has succeeded (a usage error stays one line)."""
    spec = _spec_from_args(args, session)
    unused = session.unused_negatives(spec)
    if unused and spec.guidance.scale == 1:
        args.warnings = [
            f"the negative prompt(s) {', '.join(repr(u) for u in unused)} took no part in this run: rule "
            f"{spec.guidance.rule!r} at scale 1 evaluates the positive alone; give a scale above 1 (on FLUX: "
            "true CFG, a second pass) or --rule nag or vsf (one pass)"
        ]
    return spec


def _spec_from_args(args: argparse.Namespace, session):
    return session.spec(
        args.prompt or "",
        args.negative,
        negative_scales=args.negative_scale,
        negative_windows=args.negative_window,
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
        **sdxl_from_args(args),
    )


# ---------------------------------------------------------------- generate

# Settings a PNG records: with --from-png they come from the PNG, so giving them is an error.
FROM_PNG_OWN = {
    "negative_scale": "--negative-scale",
    "negative_window": "--negative-window",
    "scale": "--scale",
    "steps": "--steps",
    "scheduler": "--scheduler",
    "seed": "--seed",
    "size": "--size",
    "width": "--width",
    "height": "--height",
    "model": "--model",
    "interval": "--interval",
    "interval_sigma": "--interval-sigma",
    "prompt_2": "--prompt-2",
    "embedded_guidance": "--embedded-guidance",
    "negative_2": "--negative-2",
    **{name: "--" + name.replace("_", "-") for name in SDXL_SIZE_OPTIONS},
}


def options_given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The flags of ``options`` (dest → flag) given on the command line, plus --rule/--rescale and rule options."""
    given = [flag for dest, flag in options.items() if getattr(args, dest, None) is not None]
    if args.rule != "sd":
        given.append("--rule")
    if args.rescale:
        given.append("--rescale")
    given += [flag for dest, flag in rule_option_flags().items() if getattr(args, dest, None) is not None]
    return given


def command_generate(args: argparse.Namespace) -> int:
    from negprompt.interfaces.outputs import check_outputs, report_written

    if args.from_png:
        if args.prompt is not None or args.negative:
            raise CommandError("--from-png takes its prompts from the PNG; give no prompt or --negative with it")
        ignored = options_given(args, FROM_PNG_OWN)
        if ignored:
            raise CommandError(
                f"--from-png regenerates with the PNG's own settings; drop {', '.join(ignored)} "
                "(only --out, --no-overwrite, --device, --dtype, --embedding and -q go with it)"
            )
        from negprompt.interfaces.png import read_png_settings

        settings, index = read_png_settings(args.from_png)
        paths = check_outputs(args.out, [settings.seeds[index]], overwrite=not args.no_overwrite)
        indices = [index]
    else:
        check_prompt_args(args)
        paths = check_outputs(args.out, args.seed or [0], overwrite=not args.no_overwrite)
        settings = indices = None
    existed = [path for path in paths if path.exists()]
    from negprompt.interfaces.png import save_generation
    from negprompt.session import respec

    if settings is not None:
        session = session_from_args(args, settings)
        settings = respec(settings, session)
    else:
        session = session_from_args(args)
        settings = settings_from_args(args, session)
    generation = session.run(settings, progress=not args.quiet)
    written = save_generation(generation, Path(args.out), indices)
    for line in report_written(written, existed):
        print(line)
    return 0


# ---------------------------------------------------------------- attend


def word_list(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def step_list(text: str) -> list[int]:
    return seed_list(text)


def command_attend(args: argparse.Namespace) -> int:
    import json

    from negprompt.analysis.attention_stats import reduce_layer, summarize
    from negprompt.attention.capture import CaptureRequest
    from negprompt.attention.figures import timeline
    from negprompt.attention.result import capture, plan_for
    from negprompt.attention.tokens import tokenize_words
    from negprompt.interfaces.outputs import report_written, write_atomically
    from negprompt.interfaces.png import save_generation

    check_prompt_args(args)
    existed = folder_outputs(args)
    session = session_from_args(args)
    components = session.components
    settings = settings_from_args(args, session)
    terms = settings.guidance.terms
    words = {}
    for branch, given in (("positive", args.words), ("negative", args.negative_words)):
        if branch not in terms:
            if given:
                raise CommandError(
                    f"--{'negative-' if branch == 'negative' else ''}words given but the run has no {branch} prompt"
                )
            continue
        first_prompt = terms[branch].prompts_for(1)[0]
        all_words = tokenize_words(components.tokenizer, first_prompt).words
        words[branch] = given if given is not None else list(dict.fromkeys(all_words))
    request = CaptureRequest(
        words=words,
        layers=args.layers,
        steps=args.capture_steps,
        average_layers=not args.per_layer,
        size=args.map_size,
        memory_limit_mb=args.memory_limit,
    )
    if not 0 <= args.image < len(settings.seeds):
        raise CommandError(f"--image {args.image} is outside the batch of {len(settings.seeds)} image(s)")
    plan = plan_for(settings, request, session)
    print(f"capture will store {plan.memory_bytes() / 2**20:.2f} MiB (limit {args.memory_limit:g} MiB)")
    result = capture(settings, request, session, trace=True, progress=not args.quiet, reducer=reduce_layer)
    out = Path(args.out)
    figure = timeline(result, components, image=args.image, columns=args.columns)
    written = save_generation(result.generation, out / "image.png")
    written += write_atomically([out / "timeline.png"], lambda final, tmp: figure.save(tmp, format="PNG"))
    written += list(result.save(out))
    summary = summarize(result)
    written += write_atomically(
        [out / "summary.json"], lambda final, tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n")
    )
    for line in report_written(written, existed):
        print(line)
    return 0


# ---------------------------------------------------------------- study and report


def command_study(args: argparse.Namespace) -> int:
    from negprompt.analysis.spec import load_spec
    from negprompt.interfaces.outputs import check_destination

    spec = load_spec(args.spec)
    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    from negprompt.analysis.study import RESULTS_FILE, run_study
    from negprompt.jobs import current_workers

    workers = current_workers(args.device)  # before the model: each process gets its own GPU
    session = session_from_args(args, model=spec.model)
    done = run_study(spec, args.out, progress=not args.quiet, session=session, workers=workers)
    if not workers.is_main:
        return 0
    rate = done.unet_rows / done.seconds if done.seconds > 0 else float("nan")
    print(f"study {spec.name!r}: {done.pairs_total} pairs × {len(spec.seeds)} seeds in {args.out}/{RESULTS_FILE}")
    print(f"this run: {done.seconds:.1f} s, {done.unet_rows} UNet evaluations ({rate:.1f} per second)")
    return 0


def finish_study_job(out_dir: Path, record: dict, payloads: list) -> list[Path]:
    """The study's merge: ``results.csv`` from the pairs' rows."""
    from negprompt.analysis.study import finish_study

    return finish_study(out_dir, payloads)


def command_merge(args: argparse.Namespace) -> int:
    """Writes a sharded job's outputs from its shards, as its last process would have."""
    from negprompt.jobs import collect, read_job

    record, payloads = read_job(args.folder), collect(args.folder)
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    command = subcommands.choices.get(record["command"])
    finish = command.get_default("finish") if command is not None else None
    if finish is None:
        raise CommandError(f"{args.folder}: no installed command {record['command']!r} can merge this job")
    for path in finish(Path(args.folder), record, payloads):
        print(f"wrote {path}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from negprompt.analysis.report import make_report

    report, figures = make_report(args.folder)
    for path in [report, *figures]:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- edit


def command_edit(args: argparse.Namespace) -> int:
    import json

    from negprompt.guidance.windows import Window
    from negprompt.interfaces.outputs import report_written

    if not args.negative or len(args.negative) != 1:
        raise CommandError("edit takes exactly one --negative")
    if sdxl_from_args(args):
        raise CommandError(
            "edit takes no --prompt-2, --negative-2 or micro-conditions; use generate with --negative-window for them"
        )
    if not 0 < args.threshold < 1:
        raise CommandError(f"threshold must be in (0, 1), got {args.threshold}")
    check_prompt_args(args)
    Window.parse(args.window)
    existed = folder_outputs(args)
    from negprompt.analysis.edit import comparison_figure, run_edit, summarize
    from negprompt.interfaces.outputs import write_atomically
    from negprompt.interfaces.png import save_generation

    session = session_from_args(args)
    outcome = run_edit(
        args.prompt or "",
        args.negative[0],
        Window.parse(args.window),
        args.seed or [0],
        word=args.word,
        threshold=args.threshold,
        region=args.region,
        model=session,
        steps=args.steps,
        scheduler=args.scheduler,
        scale=args.scale,
        size=size_pair(args, session),
        progress=not args.quiet,
        max_rows_per_call=args.rows_per_call,
    )
    out = Path(args.out)
    written = []
    for name, generation in zip(("original", "full", "edited"), outcome.generations):
        written += save_generation(generation, out / f"{name}.png")
    figure = comparison_figure(outcome)
    written += write_atomically([out / "comparison.png"], lambda final, tmp: figure.save(tmp, format="PNG"))
    record = {
        "summary": {**summarize(outcome), "rows_per_call": args.rows_per_call},
        "images": [{"seed": i.seed, **i.measures} for i in outcome.images],
    }
    written += write_atomically(
        [out / "edit.json"], lambda final, tmp: tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
    )
    for line in report_written(written, existed):
        print(line)
    summary = record["summary"]
    print(
        f"UNet rows: {summary['unet_batch_rows']} in one run vs {summary['unet_batch_rows_if_separate']} for three separate runs; "
        f"changed pixels: edited {summary['edited_changed_fraction']:.1%}, full negative {summary['full_changed_fraction']:.1%}"
    )
    return 0


# ---------------------------------------------------------------- demo


def command_demo(args: argparse.Namespace) -> int:
    from negprompt.interfaces.outputs import check_destination

    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    from negprompt.interfaces.demo import run_demo

    png, js, record = run_demo(args.out, model=session_from_args(args), steps=args.steps, progress=not args.quiet)
    print(f"wrote {png} (no negative / negative / delayed negative, for {len(record['pairs'])} prompts) and {js}")
    print(f"took {record['seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------- serve

WEB_EXTRA = "negprompt serve needs the web extra: pip install 'negprompt[web]'"


def port_number(text: str) -> int:
    value = whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {text!r}: give 1–65535")
    return value


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Address, model and the limits of one request (one --max-… flag per field of ServerLimits)."""
    from negprompt.interfaces.web.settings import ServerLimits

    parser.add_argument(
        "--model", default=None, help="diffusers directory, cached model id, 'shapes' (default) or 'shapes-distilled'"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=port_number, default=7860, help="port, 1–65535 (default 7860)")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other machines can reach; the page has no login (default: refused)",
    )
    limits = parser.add_argument_group("limits of one request (beyond them the page says which flag to raise)")
    for name, what, default, ceiling in ServerLimits.described():
        limits.add_argument(
            ServerLimits.flag(name),
            dest=f"max_{name}",
            type=positive_int,
            default=default,
            metavar="N",
            help=f"most {what}, 1–{ceiling} (default {default})",
        )
    add_device_options(parser)


def command_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import socket

    from negprompt.devices import DEVICE_CHOICES, DTYPES
    from negprompt.interfaces.web.settings import ServerLimits, is_loopback

    limits = ServerLimits(**{name: getattr(args, f"max_{name}") for name, *_ in ServerLimits.described()})
    if args.device is not None and args.device not in DEVICE_CHOICES:
        raise CommandError(f"unknown device {args.device!r}; accepted: {', '.join(DEVICE_CHOICES)}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise CommandError(f"unknown dtype {args.dtype!r}; accepted: {', '.join(DTYPES)}")
    local = is_loopback(args.host)
    if not local and not args.allow_remote:
        raise CommandError(
            f"--host {args.host} can be reached from other machines and the page has no login; "
            "add --allow-remote to serve there anyway, or keep the default 127.0.0.1"
        )
    if importlib.util.find_spec("gradio") is None:
        raise CommandError(WEB_EXTRA)
    try:  # a port in use is found before the model loads
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as error:
        raise CommandError(
            f"cannot listen on {args.host}:{args.port} ({error.strerror}); give another --port"
        ) from None
    if not local:
        print(
            f"negprompt: warning: serving on {args.host}:{args.port}, reachable from other machines; "
            "anyone who reaches it can run the model (there is no login)",
            file=sys.stderr,
        )
    session = session_from_args(args)
    from negprompt.interfaces.web.app import serve

    serve(session, args.host, args.port, limits)
    return 0


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="negprompt", description="Controllable, explainable negative prompts.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate images with negative prompts")
    add_prompt_options(generate)
    generate.add_argument(
        "-o",
        "--out",
        default="negprompt.png",
        help="output PNG (default negprompt.png in the current folder; several seeds: NAME-s<seed>.png beside it)",
    )
    generate.add_argument(
        "--from-png",
        metavar="FILE",
        help="regenerate the image a negprompt PNG was made with, from its own settings (default: off)",
    )
    add_overwrite_option(generate)
    generate.set_defaults(handler=command_generate)

    attend = commands.add_parser("attend", help="capture cross-attention maps and draw the heat-map timeline")
    add_prompt_options(attend)
    attend.add_argument("--out", default="attend", help="output folder (default attend/ in the current folder)")
    attend.add_argument(
        "--words", type=word_list, default=None, help="positive words to map, comma-separated (default: all)"
    )
    attend.add_argument("--negative-words", type=word_list, default=None, help="negative words to map (default: all)")
    attend.add_argument(
        "--layers",
        type=word_list,
        default=None,
        help="layers: map sides in latent pixels (16) or module paths/prefixes, comma-separated (default: all "
        "cross-attention layers)",
    )
    attend.add_argument(
        "--capture-steps", type=step_list, default=None, help="steps to keep: 0-9 or 0,5,10 (default all)"
    )
    attend.add_argument("--per-layer", action="store_true", help="keep each layer's maps (default: mean over layers)")
    attend.add_argument(
        "--map-size", type=positive_int, default=None, help="side of stored maps (default: largest layer's)"
    )
    attend.add_argument(
        "--memory-limit", type=number, default=1024.0, help="MiB the capture may store (default 1024 MiB)"
    )
    attend.add_argument(
        "--image",
        type=non_negative_int,
        default=0,
        help="which image of the batch the timeline shows, from 0 (default 0)",
    )
    attend.add_argument("--columns", type=positive_int, default=10, help="steps shown in the timeline (default 10)")
    add_overwrite_option(attend)
    attend.set_defaults(handler=command_attend)

    edit = commands.add_parser("edit", help="no negative / negative at all steps / negative in a window, compared")
    add_prompt_options(edit)
    edit.add_argument("--window", default="0.25:", help="steps in which the negative acts (default 0.25:)")
    edit.add_argument(
        "--word", default=None, help="the negative's word whose region is edited (default: its last content word)"
    )
    edit.add_argument(
        "--threshold",
        type=number,
        default=0.5,
        help="attention-mask threshold in (0, 1), a fraction of the map's maximum (default 0.5)",
    )
    edit.add_argument(
        "--region",
        default="auto",
        help="region source: auto, attention or detector (detector: models that declare a region finder, "
        "as the bundled one; default auto: the detector where there is one)",
    )
    edit.add_argument(
        "--rows-per-call",
        type=positive_int,
        default=None,
        help="split each step's UNet call into chunks of this many rows (detector region only; faster on CPUs; "
        "recorded in the PNGs; default: one call per generation and step)",
    )
    edit.add_argument("--out", default="edit", help="output folder (default edit/ in the current folder)")
    add_overwrite_option(edit)
    edit.set_defaults(handler=command_edit)

    study = commands.add_parser("study", help="run a strength study (r_t curves); resumes where it stopped")
    study.add_argument("spec", help="a YAML spec, or a built-in one: shapes, ban2024-sd2")
    study.add_argument("--out", required=True, help="results folder (a rerun resumes it)")
    add_quiet_option(study)
    add_device_options(study)
    study.set_defaults(handler=command_study, finish=finish_study_job)

    merge = commands.add_parser(
        "merge", help="write a sharded study, edit-sweep, bench-methods or evaluate from its shards"
    )
    merge.add_argument("folder", help="the job's --out folder (it holds job.json and shards/)")
    merge.set_defaults(handler=command_merge)

    report = commands.add_parser("report", help="curves and a Markdown summary of a study folder")
    report.add_argument("folder")
    report.set_defaults(handler=command_report)

    demo = commands.add_parser("demo", help="the bundled model with no / a / a delayed negative, in one figure")
    demo.add_argument("--out", default="demo", help="output folder for demo.png and demo.json (default demo/)")
    demo.add_argument("--model", default=None, help="model (default: the bundled one)")
    demo.add_argument("--steps", type=step_count, default=None, help="inference steps, 1–1000 (default: the model's)")
    add_quiet_option(demo)
    add_device_options(demo)
    demo.set_defaults(handler=command_demo)

    serve = commands.add_parser("serve", help="a web page over the model: generate, attention, edit (the web extra)")
    add_serve_options(serve)
    serve.set_defaults(handler=command_serve)

    add_plugin_commands(commands)
    return parser


def add_plugin_commands(commands: argparse._SubParsersAction) -> None:
    """Commands of installed packages: each entry point of the group ``negprompt.commands`` names a
    ``register(subparsers)`` function that adds its subcommands, each with a ``handler`` default.

    The bundled shapes world's ``train``, ``evaluate``, ``bench-methods`` and ``edit-sweep`` come this way.
    """
    from importlib.metadata import entry_points

    seen = set()
    for point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda p: (p.name, p.value)):
        if point.name in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(point.name)
        try:
            register = point.load()
        except Exception as error:  # a broken plugin must not take the other commands down
            print(f"negprompt: warning: commands {point.name!r} ({point.value}) not loaded: {error}", file=sys.stderr)
            continue
        register(commands)


def quiet_libraries() -> None:
    """Keeps diffusers' and transformers' loading chatter (progress bars, hints) off the terminal."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        code = args.handler(args)
        for warning in getattr(args, "warnings", []) if code == 0 else []:
            print(f"negprompt: warning: {warning}", file=sys.stderr)
        return code
    except NegpromptError as error:
        print(f"negprompt: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("negprompt: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the machine, not the input: a full disk, a vanished folder, an I/O error
        where = f": {error.filename}" if error.filename else ""
        print(
            f"negprompt: failed: {error.strerror or error}{where}; no half-written file is kept "
            "(study and train resume where they stopped)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
