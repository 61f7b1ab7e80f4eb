"""``negprompt generate``: images (or a video model's clips) with negative prompts, or a PNG's image again
(``--from-png``), or a run's JSON again (``--from-json``)."""

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
    positive_number,
    rule_option_flags,
    run_settings_from_args,
    session_from_args,
    unused_negative_warnings,
)
from negprompt.interfaces.video import CONTAINERS as VIDEO_SUFFIXES
from negprompt.interfaces.video import DEFAULT_FPS

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
    "frames": "--frames",
    "scale_2": "--scale-2",
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


def check_from_png_args(args: argparse.Namespace, flag: str = "--from-png", source: str = "PNG") -> None:
    """With --from-png (or --from-json) the file gives the prompts and settings: giving them too is an error."""
    if args.from_png and getattr(args, "from_json", None):
        raise CommandError("give --from-png FILE or --from-json FILE, not both")
    if args.prompt is not None or args.negative:
        raise CommandError(f"{flag} takes its prompts from the {source}; give no prompt or --negative with it")
    ignored = options_given(args, FROM_PNG_OWN)
    if ignored:
        raise CommandError(
            f"{flag} regenerates with the {source}'s own settings; drop {', '.join(ignored)} "
            "(only --out, --no-overwrite, --device, --dtype, --embedding, --fps and -q go with it)"
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
    """Generates the images the options (or the PNG of --from-png) describe and writes them as PNGs; a video
    run (frames (B, F, H, W, 3)), or the run of --from-json, goes to :func:`generate_from_record`."""
    from negprompt.interfaces.outputs import check_outputs, report_written
    from negprompt.interfaces.video import check_fps, check_video_outputs

    if args.fps is not None:
        check_fps(args.fps)
    if getattr(args, "from_json", None) or Path(args.out).suffix.lower() in VIDEO_SUFFIXES:
        return generate_from_record(args)
    if args.from_png:
        check_from_png_args(args)
        from negprompt.interfaces.png import read_png_settings

        settings, index = read_png_settings(args.from_png)
        paths = check_outputs(args.out, [settings.seeds[index]], overwrite=not args.no_overwrite)
        indices = [index]
    else:
        check_prompt_given(args)
        paths = check_outputs(args.out, args.seed or [0], overwrite=not args.no_overwrite)
        check_video_outputs(args.out, args.seed or [0])  # where a video model's files would go: writable
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
    if settings.frames > 1:  # a video: its files, not the PNGs, must not exist with --no-overwrite (before sampling)
        check_video_outputs(args.out, settings.seeds, overwrite=not args.no_overwrite)
    generation = session.run(settings, progress=not args.quiet)
    if generation.pixels.ndim == 5:  # a video model's frames (B, F, H, W, 3)
        return write_video(args, generation, warnings)
    written = save_generation(generation, Path(args.out), indices)
    for line in report_written(written, existed):
        print(line)
    return CommandResult(0, warnings)


def check_prompt_given(args: argparse.Namespace) -> None:
    """A bare ``negprompt generate`` must not quietly draw an unconditional image; the prompt options are checked."""
    if args.prompt is None:
        raise CommandError(
            "give a prompt, e.g. negprompt generate 'a red circle' --negative 'a hat' "
            "('' draws without one; --from-png FILE draws a PNG's image again)"
        )
    check_prompt_args(args)


def generate_from_record(args: argparse.Namespace) -> CommandResult:
    """--from-json FILE (a run's JSON), or --out NAME.mp4 / NAME.webp: outputs planned as a video's, checked
    before any model loads. A model that makes images instead writes them as NAME.png (-s<seed>)."""
    from negprompt.interfaces.outputs import check_outputs, report_written
    from negprompt.interfaces.png import save_generation
    from negprompt.interfaces.video import check_video_outputs, read_run_json
    from negprompt.session import respec

    record, out, overwrite = None, Path(args.out), not args.no_overwrite
    if args.from_json:
        check_from_png_args(args, "--from-json", "JSON")
        record = read_run_json(args.from_json)
    else:
        check_prompt_given(args)
    seeds = record.settings.seeds if record else args.seed or [0]
    if record is not None and record.kind == "image":
        if out.suffix.lower() != ".png":
            raise CommandError(f"{args.from_json} records images, not a video; give --out NAME.png")
        paths = check_outputs(out, seeds, overwrite=overwrite)
    else:
        paths = check_video_outputs(out, seeds, overwrite=overwrite).all_files()
        if record is None:  # the model may make images: NAME.png beside
            paths += check_outputs(out.with_suffix(".png"), seeds, overwrite=overwrite)
    existed = [path for path in paths if path.exists()]
    warnings: tuple[str, ...] = ()
    if record is not None:
        session = session_from_args(args, record.settings)
        settings = respec(record.settings, session)
    else:
        session = session_from_args(args)
        settings = session.spec_from(run_settings_from_args(args))
        warnings = unused_negative_warnings(session, settings) + size_warnings(session, settings)
    generation = session.run(settings, progress=not args.quiet)
    if generation.pixels.ndim == 5:
        return write_video(args, generation, warnings, args.fps or (record.fps if record else None))
    written = save_generation(generation, out.with_suffix(".png"))
    for line in report_written(written, existed):
        print(line)
    if out.suffix.lower() != ".png":
        warnings += (f"model {settings.model} makes images, not a video: wrote PNGs instead of {out.name}",)
    return CommandResult(0, warnings)


def write_video(args: argparse.Namespace, generation, warnings: tuple[str, ...], fps: float | None = None):
    """Writes a video run's clips, frames and JSON for --out (see :mod:`negprompt.interfaces.video`)."""
    from negprompt.interfaces.video import check_video_outputs, save_video_generation

    check_video_outputs(args.out, generation.spec.seeds, overwrite=not args.no_overwrite)
    lines, note = save_video_generation(generation, args.out, fps or args.fps or DEFAULT_FPS)
    for line in lines:
        print(line)
    return CommandResult(0, warnings + ((note,) if note else ()))


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``generate``."""
    generate = commands.add_parser("generate", help="generate images with negative prompts")
    add_prompt_options(generate)
    generate.add_argument(
        "-o",
        "--out",
        default="negprompt.png",
        help="output PNG (default negprompt.png in the current folder; several seeds: NAME-s<seed>.png beside it); "
        "a video model writes NAME.mp4 (or NAME.webp), NAME_frames/ and NAME.json beside it (docs/video.md)",
    )
    generate.add_argument(
        "--from-png",
        metavar="FILE",
        help="regenerate the image a negprompt PNG was made with, from its own settings (default: off)",
    )
    generate.add_argument(
        "--from-json",
        metavar="FILE",
        help="run again the video (or images) whose NAME.json a negprompt video run wrote (default: off)",
    )
    generate.add_argument(
        "--fps",
        type=positive_number,
        default=None,
        help=f"frames a second of a video model's MP4/WebP (default: the JSON's with --from-json, else {DEFAULT_FPS:g})",
    )
    add_overwrite_option(generate)
    generate.set_defaults(handler=command_generate)
