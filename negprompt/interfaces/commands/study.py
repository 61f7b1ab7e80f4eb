"""``negprompt study`` (a strength study, resumable), ``merge`` (a sharded job's outputs from its shards)
and ``report`` (curves and a summary of a study folder)."""

from __future__ import annotations

import argparse
import errno
import os
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
    print(f"study {spec.name!r}: {done.pairs_total} pairs × {len(spec.seeds)} seeds in {Path(args.out) / RESULTS_FILE}")
    print(f"this run: {done.seconds:.1f} s, {done.unet_rows} UNet evaluations ({rate:.1f} per second)")
    return 0


def finish_study_job(out_dir: Path, record: dict, payloads: list) -> list[Path]:
    """The study's merge: ``results.csv`` from the pairs' rows."""
    from negprompt.analysis.study import finish_study

    return finish_study(out_dir, payloads)


def check_study_unit(record: dict, unit: int, payload) -> None:
    """A study's unit as its shard holds it (:func:`negprompt.analysis.study.check_study_payload`)."""
    from negprompt.analysis.study import check_study_payload

    check_study_payload(record, unit, payload)


def check_folder_to_read(folder: str | Path) -> Path:
    """The folder a command reads (merge, report), refused in one line if its path cannot name one: a
    loop of symbolic links, a name too long, a file in the middle (a missing folder is the reader's to say)."""
    from negprompt.interfaces.outputs import shown

    path = Path(folder)
    try:
        os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR):
            raise
        raise CommandError(
            f"cannot read {shown(path)}: {error.strerror.lower()}; give the path of an existing folder"
        ) from None
    return path


def command_merge(args: argparse.Namespace, installed: dict[str, argparse.ArgumentParser]) -> int:
    """Writes a sharded job's outputs from its shards, as its last process would have: with the ``finish``
    default of the command that ran the job, found among the ``installed`` commands (name → parser).
    Every shard is read and every unit checked (the command's ``check_payload`` default) before any
    output is written or replaced."""
    from negprompt.interfaces.outputs import report_written
    from negprompt.jobs import collect, read_job

    record = read_job(check_folder_to_read(args.folder))
    command = installed.get(record["command"])
    payloads = collect(args.folder, check=command.get_default("check_payload") if command is not None else None)
    finish = command.get_default("finish") if command is not None else None
    if finish is None:
        raise CommandError(f"{args.folder}: no installed command {record['command'][:40]!r} can merge this job")
    folder = Path(args.folder)
    existed = [path for path in folder.iterdir() if path.is_file()]
    for line in report_written(finish(folder, record, payloads), existed):
        print(line)
    return 0


def command_report(args: argparse.Namespace) -> int:
    """Writes the report and figures of a study folder."""
    from negprompt.analysis.report import make_report
    from negprompt.interfaces.outputs import report_written

    folder = check_folder_to_read(args.folder)
    existed = [path for path in folder.iterdir() if path.is_file()] if folder.is_dir() else []
    report, figures = make_report(folder)
    for line in report_written([report, *figures], existed):
        print(line)
    return 0


def builtin_specs() -> list[str]:
    """The names of the built-in study specs (``negprompt/studies/*.yaml``)."""
    from negprompt.analysis.spec import BUILTIN_DIR

    return sorted(path.stem for path in BUILTIN_DIR.glob("*.yaml"))


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``study``, ``merge`` and ``report``."""
    study = commands.add_parser("study", help="run a strength study (r_t curves); resumes where it stopped")
    study.add_argument("spec", help=f"a YAML spec, or a built-in one: {', '.join(builtin_specs())}")
    study.add_argument("--out", required=True, help="results folder (a rerun resumes it)")
    add_quiet_option(study)
    add_device_options(study)
    study.set_defaults(handler=command_study, finish=finish_study_job, check_payload=check_study_unit)

    merge = commands.add_parser(
        "merge", help="write a sharded study, edit-sweep, bench-methods or evaluate from its shards"
    )
    merge.add_argument("folder", help="the job's --out folder (it holds job.json and shards/)")
    # every command added to ``commands``, plugins' too: they are all registered before a handler runs
    merge.set_defaults(handler=partial(command_merge, installed=commands.choices))

    report = commands.add_parser("report", help="curves and a Markdown summary of a study folder")
    report.add_argument("folder")
    report.set_defaults(handler=command_report)
