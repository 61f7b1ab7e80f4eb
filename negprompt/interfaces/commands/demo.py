"""``negprompt demo``: the bundled model with no, a, and a delayed negative, in one figure."""

from __future__ import annotations

import argparse

from negprompt.interfaces.options import add_device_options, add_quiet_option, session_from_args, step_count

ORDER = 50  # its place in negprompt --help


def command_demo(args: argparse.Namespace) -> int:
    """Writes demo.png and demo.json into --out (:func:`negprompt.interfaces.demo.run_demo`)."""
    from negprompt.interfaces.outputs import check_destination

    check_destination(args.out, folder=True)  # before the heavy imports: a bad path answers at once
    from pathlib import Path

    from negprompt.interfaces.demo import run_demo
    from negprompt.interfaces.outputs import report_written

    existed = [path for path in Path(args.out).glob("demo.*") if path.is_file()]
    png, js, record = run_demo(args.out, model=session_from_args(args), steps=args.steps, progress=not args.quiet)
    written_png, written_js = report_written([png, js], existed)
    print(f"{written_png} (no negative / negative / delayed negative, for {len(record['pairs'])} prompts)")
    print(written_js)
    print(f"took {record['seconds']:.1f} s")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``demo``."""
    demo = commands.add_parser("demo", help="the bundled model with no / a / a delayed negative, in one figure")
    demo.add_argument("--out", default="demo", help="output folder for demo.png and demo.json (default demo/)")
    demo.add_argument("--model", default=None, help="model (default: the bundled one)")
    demo.add_argument("--steps", type=step_count, default=None, help="inference steps, 1–1000 (default: the model's)")
    add_quiet_option(demo)
    add_device_options(demo)
    demo.set_defaults(handler=command_demo)
