"""``negprompt edit``: no negative, the negative at all steps, and the negative in a window, compared."""

from __future__ import annotations

import argparse
from pathlib import Path

from negprompt.interfaces.options import (
    CommandError,
    add_overwrite_option,
    add_prompt_options,
    check_prompt_args,
    folder_outputs,
    number,
    positive_int,
    sdxl_from_args,
    session_from_args,
    size_pair,
)

ORDER = 30  # its place in negprompt --help


def check_edit_args(args: argparse.Namespace) -> None:
    """What edit takes beyond the prompt options' own checks: one negative, no SDXL extras, a threshold
    in (0, 1) and a window."""
    from negprompt.guidance.windows import Window

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


def command_edit(args: argparse.Namespace) -> int:
    """Runs the three variants together; writes their PNGs, the comparison figure and edit.json."""
    from negprompt.guidance.windows import Window

    check_edit_args(args)
    existed = folder_outputs(args)
    from negprompt.analysis.edit import run_edit

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
    summary = write_edit_outputs(args, outcome, existed)
    print(
        f"UNet rows: {summary['unet_batch_rows']} in one run vs {summary['unet_batch_rows_if_separate']} for three separate runs; "
        f"changed pixels: edited {summary['edited_changed_fraction']:.1%}, full negative {summary['full_changed_fraction']:.1%}"
    )
    return 0


def write_edit_outputs(args: argparse.Namespace, outcome, existed: list[Path]) -> dict:
    """Writes original/full/edited.png, comparison.png and edit.json into --out, says what it wrote, and
    returns the summary it recorded."""
    from negprompt.analysis.edit import comparison_figure, summarize
    from negprompt.files import write_atomically, write_json
    from negprompt.interfaces.outputs import report_written
    from negprompt.interfaces.png import save_generation

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
    written.append(write_json(out / "edit.json", record, indent=1, default=float))
    for line in report_written(written, existed):
        print(line)
    return record["summary"]


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``edit``."""
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
