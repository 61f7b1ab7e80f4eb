"""``negprompt study`` (a strength study, resumable), ``merge`` (a sharded job's outputs from its shards)
and ``report`` (curves and a summary of a study folder)."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from negprompt.interfaces.options import CommandError, add_device_options, add_quiet_option, session_from_args

ORDER = 40  # its place in negprompt --help


def command_study(args: argparse.Namespace) -> int:
    """Runs (or resumes) the study of the spec into --out; the main process says what it did."""
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


def command_merge(args: argparse.Namespace, installed: dict[str, argparse.ArgumentParser]) -> int:
    """Writes a sharded job's outputs from its shards, as its last process would have: with the ``finish``
    default of the command that ran the job, found among the ``installed`` commands (name → parser)."""
    from negprompt.jobs import collect, read_job

    record, payloads = read_job(args.folder), collect(args.folder)
    command = installed.get(record["command"])
    finish = command.get_default("finish") if command is not None else None
    if finish is None:
        raise CommandError(f"{args.folder}: no installed command {record['command']!r} can merge this job")
    for path in finish(Path(args.folder), record, payloads):
        print(f"wrote {path}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    """Writes the report and figures of a study folder."""
    from negprompt.analysis.report import make_report

    report, figures = make_report(args.folder)
    for path in [report, *figures]:
        print(f"wrote {path}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``study``, ``merge`` and ``report``."""
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
    # every command added to ``commands``, plugins' too: they are all registered before a handler runs
    merge.set_defaults(handler=partial(command_merge, installed=commands.choices))

    report = commands.add_parser("report", help="curves and a Markdown summary of a study folder")
    report.add_argument("folder")
    report.set_defaults(handler=command_report)
