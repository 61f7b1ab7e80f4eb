"""``negprompt generate``: images with negative prompts, or a PNG's image again (``--from-png``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from negprompt.interfaces.options import (
    SDXL_SIZE_OPTIONS,
    CommandError,
    CommandResult,
    add_overwrite_option,
    add_prompt_options,
    check_prompt_args,
    rule_option_flags,
    run_settings_from_args,
    session_from_args,
    unused_negative_warnings,
)

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

ORDER = 10  # its place in negprompt --help


def options_given(args: argparse.Namespace, options: dict[str, str]) -> list[str]:
    """The flags of ``options`` (dest → flag) given on the command line, plus --rule/--rescale and rule options."""
    given = [flag for dest, flag in options.items() if getattr(args, dest, None) is not None]
    if args.rule != "sd":
        given.append("--rule")
    if args.rescale:
        given.append("--rescale")
    given += [flag for dest, flag in rule_option_flags().items() if getattr(args, dest, None) is not None]
    return given


def check_from_png_args(args: argparse.Namespace) -> None:
    """With --from-png the PNG gives the prompts and settings: giving them too is an error."""
    if args.prompt is not None or args.negative:
        raise CommandError("--from-png takes its prompts from the PNG; give no prompt or --negative with it")
    ignored = options_given(args, FROM_PNG_OWN)
    if ignored:
        raise CommandError(
            f"--from-png regenerates with the PNG's own settings; drop {', '.join(ignored)} "
            "(only --out, --no-overwrite, --device, --dtype, --embedding and -q go with it)"
        )


# A UNet draws what it learned at its trained size (its config's sample_size × the latent factor);
# much larger images repeat the subject (the bundled 32 px model at 64 px draws four small objects),
# much smaller ones break up. Transformer families (SD3, FLUX …) are trained over many sizes.
AREA_RATIOS_DRAWN_QUIETLY = (0.5, 1.5)  # image area / trained area; beyond them a warning


def size_warnings(session, spec) -> tuple[str, ...]:
    """A warning when a UNet model draws at an area far from its trained size's, else none."""
    components = session.components
    if components.unet is None:
        return ()
    side = components.default_size
    ratio = spec.height * spec.width / (side * side)
    low, high = AREA_RATIOS_DRAWN_QUIETLY
    if low <= ratio <= high:
        return ()
    return (
        f"{spec.width}×{spec.height} is {ratio:.2g}× the area of the size this model was trained at "
        f"({side}×{side}, its UNet's sample size): its objects may repeat or break up; drawn anyway "
        f"(--size {side} draws at the trained size)",
    )


def command_generate(args: argparse.Namespace) -> CommandResult:
    """Generates the images the options (or the PNG of --from-png) describe and writes them as PNGs."""
    from negprompt.interfaces.outputs import check_outputs, report_written

    if args.from_png:
        check_from_png_args(args)
        from negprompt.interfaces.png import read_png_settings

        settings, index = read_png_settings(args.from_png)
        paths = check_outputs(args.out, [settings.seeds[index]], overwrite=not args.no_overwrite)
        indices = [index]
    else:
        if args.prompt is None:  # a bare `negprompt generate` must not quietly draw an unconditional image
            raise CommandError(
                "give a prompt, e.g. negprompt generate 'a red circle' --negative 'a hat' "
                "('' draws without one; --from-png FILE draws a PNG's image again)"
            )
        check_prompt_args(args)
        paths = check_outputs(args.out, args.seed or [0], overwrite=not args.no_overwrite)
        settings = indices = None
    existed = [path for path in paths if path.exists()]
    from negprompt.interfaces.png import save_generation
    from negprompt.session import respec

    warnings: tuple[str, ...] = ()
    if settings is not None:
        session = session_from_args(args, settings)
        settings = respec(settings, session)
    else:
        session = session_from_args(args)
        settings = session.spec_from(run_settings_from_args(args))
        warnings = unused_negative_warnings(session, settings) + size_warnings(session, settings)
    generation = session.run(settings, progress=not args.quiet)
    written = save_generation(generation, Path(args.out), indices)
    for line in report_written(written, existed):
        print(line)
    return CommandResult(0, warnings)


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``generate``."""
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
